// CUDA kernels of the distillation losses (common/distill_math.h). A block of
// kDistillThreads threads per row: each thread keeps online log-sum-exps of its share of
// the student's and the teacher's scaled row, merged across the block in a fixed order
// (bitwise reproducible); a second pass over the row sums the divergence's terms, and
// backward writes the student's gradient. Plain strided loads: these kernels are
// correct and simple, not yet tuned (see bench/results for what is measured). The file
// also compiles as host C++ under tests/cuda_emulator.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "common/distill_math.h"
#include "cuda/distill.h"

namespace fused_ce::cuda {

constexpr int kDistillThreads = 256;

// Folds the block's per-thread values into one, thread by thread in a fixed order,
// through shared memory; every thread gets the result.
template <typename T, typename Merge>
__device__ __forceinline__ T block_merge(T value, Merge merge) {
  __shared__ T part[kDistillThreads];
  part[threadIdx.x] = value;
  __syncthreads();
  T total = part[0];
  for (int k = 1; k < kDistillThreads; ++k) total = merge(total, part[k]);
  __syncthreads();  // part may be reused by the next merge
  return total;
}

template <typename scalar_t, DistillKind kKind>
__global__ void __launch_bounds__(kDistillThreads) distill_forward_kernel(const DistillRows<scalar_t> r) {
  using acc_t = acc_type<scalar_t>;
  const int64_t row = blockIdx.x;
  if (row >= r.num_rows) return;
  const scalar_t* s = r.student + row * r.student_stride;
  const scalar_t* t = r.teacher + row * r.teacher_stride;
  RowStats<acc_t> ss = empty_row_stats<acc_t>(), st = empty_row_stats<acc_t>();
  for (int64_t c = threadIdx.x; c < r.num_classes; c += kDistillThreads) {
    const acc_t a = static_cast<acc_t>(s[c]) * r.inv_t, b = static_cast<acc_t>(t[c]) * r.inv_t;
    ss = merge(ss, RowStats<acc_t>{a, a == neg_inf<acc_t>() ? acc_t(0) : acc_t(1), acc_t(0), acc_t(0)});
    st = merge(st, RowStats<acc_t>{b, b == neg_inf<acc_t>() ? acc_t(0) : acc_t(1), acc_t(0), acc_t(0)});
  }
  auto merge_stats = [](const RowStats<acc_t>& x, const RowStats<acc_t>& y) { return merge(x, y); };
  const acc_t lse_s = row_lse(block_merge(ss, merge_stats));
  const acc_t lse_t = row_lse(block_merge(st, merge_stats));
  acc_t value = 0, aux = 0;
  for (int64_t c = threadIdx.x; c < r.num_classes; c += kDistillThreads) {
    const DistillTerm<acc_t> term = distill_term<kKind>(static_cast<acc_t>(s[c]) * r.inv_t - lse_s,
                                                        static_cast<acc_t>(t[c]) * r.inv_t - lse_t, r.beta);
    value += term.value;
    aux += term.aux;
  }
  auto add = [](acc_t x, acc_t y) { return x + y; };
  value = block_merge(value, add);
  aux = block_merge(aux, add);
  if (threadIdx.x == 0) {
    r.loss[row] = value;
    r.aux[row] = aux;
    r.lse_student[row] = lse_s;
    r.lse_teacher[row] = lse_t;
  }
}

template <typename scalar_t, DistillKind kKind>
__global__ void __launch_bounds__(kDistillThreads) distill_backward_kernel(const DistillRows<scalar_t> r) {
  using acc_t = acc_type<scalar_t>;
  const int64_t row = blockIdx.x;
  if (row >= r.num_rows) return;
  const scalar_t* s = r.student + row * r.student_stride;
  const scalar_t* t = r.teacher + row * r.teacher_stride;
  scalar_t* g = r.grad + row * r.num_classes;
  const acc_t scale = r.grad_loss[row * r.grad_loss_stride] * r.inv_t;
  const acc_t lse_s = r.lse_student[row], lse_t = r.lse_teacher[row], aux = r.aux[row];
  for (int64_t c = threadIdx.x; c < r.num_classes; c += kDistillThreads) {
    const acc_t d = scale == acc_t(0)
                        ? acc_t(0)  // a masked row, or a zero upstream gradient
                        : scale * distill_grad<kKind>(static_cast<acc_t>(s[c]) * r.inv_t - lse_s,
                                                      static_cast<acc_t>(t[c]) * r.inv_t - lse_t, r.beta, aux);
    g[c] = static_cast<scalar_t>(d);
  }
}

// Turns the runtime kind into the kernels' template argument.
template <typename Fn>
void dispatch_distill_kind(int64_t kind, Fn&& fn) {
  switch (static_cast<DistillKind>(kind)) {
    case DistillKind::kForwardKL: fn(std::integral_constant<DistillKind, DistillKind::kForwardKL>{}); break;
    case DistillKind::kReverseKL: fn(std::integral_constant<DistillKind, DistillKind::kReverseKL>{}); break;
    default: fn(std::integral_constant<DistillKind, DistillKind::kJSD>{}); break;
  }
}

}  // namespace fused_ce::cuda
