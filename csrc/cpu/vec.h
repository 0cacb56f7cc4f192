// Vector helpers both CPU kernel files use (kernels.cpp, distill.cpp). Included by
// files compiled once per instruction set: everything here lands in that file's
// CPU_CAPABILITY namespace, with the matching at::vec::Vectorized.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#ifndef CPU_CAPABILITY
#error "cpu/vec.h belongs to the files compiled once per CPU_CAPABILITY by setup.py"
#endif

namespace fused_ce::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// fp32 math for fp32/fp16/bf16 logits, fp64 for fp64.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// 2048 fp32 logits and their target weights (16 KB) stay in L1 between the
// max pass and the exp pass of a block.
constexpr int64_t kBlock = 2048;

template <typename scalar_t>
Vectorized<acc_type<scalar_t>> load_vec(const scalar_t* p) {
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    Vectorized<float> out;
    at::vec::load_to_float(p, out);
    return out;
  } else {
    return Vectorized<scalar_t>::loadu(p);
  }
}

template <typename scalar_t>
void store_vec(const Vectorized<acc_type<scalar_t>>& v, scalar_t* p, int64_t count) {
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, count);
  } else {
    v.store(p, count);
  }
}

// exp of arguments that are finite or -inf (z - max, z - lse): for float the
// polynomial exp_u20 (20 ulp, 2x faster than Sleef's); float64 stays exact.
template <typename acc_t>
Vectorized<acc_t> exp_bounded(const Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// Rows per parallel task: about 32k logits, at least one row.
inline int64_t grain_rows(int64_t num_classes) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(num_classes, 1));
}

template <typename acc_t>
acc_t reduce_sum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return a + b; }, v);
}

template <typename acc_t>
acc_t reduce_max(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return at::vec::maximum(a, b); }, v);
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace fused_ce::cpu
