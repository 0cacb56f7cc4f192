// The distillation math shared by the CPU and CUDA kernels.
//
// A student row z and a teacher row u (V classes each) at temperature T give
//
//     s = z / T, t = u / T,   ls = s - lse(s), lt = t - lse(t),   p = e^ls (student), q = e^lt (teacher)
//
// and, per row, one of three divergences (each term 0 where its probability is 0,
// as xlogy defines 0 log 0, so vocabulary masked to -inf adds nothing):
//
//     forward KL   KL(q || p) = sum_c q_c (lt_c - ls_c)
//     reverse KL   KL(p || q) = sum_c p_c (ls_c - lt_c)
//     JSD(beta)    beta KL(q || m) + (1 - beta) KL(p || m),   m = beta q + (1 - beta) p
//
// Their gradients with respect to s (the student's scaled logits) take one form,
//
//     d/ds_c = a p_c (r_c - R) + b (p_c - q_c)
//
//     forward KL   a = 0,          b = 1
//     reverse KL   a = 1,          b = 0,   r = ls - lt,   R = KL(p || q)
//     JSD          a = 1 - beta,   b = 0,   r = ls - lm,   R = KL(p || m)
//
// so the kernels compute R (the "aux" statistic) with the loss, and backward writes
// g / T * (a p (r - R) + b (p - q)) for an upstream g.
//
// The functions are templates over the arithmetic type: float or double, and on the
// CPU at::vec::Vectorized of them (the overloads at the end of this file), so that the
// vectorised CPU loops and the CUDA kernels run the same formulas.
#pragma once

#include <cstdint>

#include "common/ce_math.h"

namespace fused_ce {

enum class DistillKind : int64_t { kForwardKL = 0, kReverseKL = 1, kJSD = 2 };

// value where prob is not 0, else 0 (0 log 0 = 0; also 0 * inf).
FUSED_CE_HOST_DEVICE float unless_zero(float prob, float value) { return prob == 0.0f ? 0.0f : value; }
FUSED_CE_HOST_DEVICE double unless_zero(double prob, double value) { return prob == 0.0 ? 0.0 : value; }

// at::vec::Vectorized (CPU): the same formulas, lane by lane (declared before the templates
// that call them, which find them by ordinary lookup). exp_u20 for float (20 ulp,
// the arguments are <= 0 here), exp for double.
template <typename Vec>
inline Vec unless_zero(const Vec& prob, const Vec& value) {
  return Vec::blendv(value, Vec(0), prob == Vec(0));
}
template <typename Vec>
inline Vec exp_(const Vec& x) {
  if constexpr (sizeof(typename Vec::value_type) == 4) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}
template <typename Vec>
inline Vec log_(const Vec& x) {
  return x.log();
}

// One class's term of the divergence, and its term of R.
template <typename T>
struct DistillTerm {
  T value;
  T aux;
};

template <DistillKind kKind, typename T>
FUSED_CE_HOST_DEVICE DistillTerm<T> distill_term(T ls, T lt, T beta) {
  if constexpr (kKind == DistillKind::kForwardKL) {
    const T q = exp_(lt);
    return {unless_zero(q, q * (lt - ls)), T(0)};
  } else if constexpr (kKind == DistillKind::kReverseKL) {
    const T p = exp_(ls);
    const T v = unless_zero(p, p * (ls - lt));
    return {v, v};
  } else {
    const T p = exp_(ls), q = exp_(lt);
    const T lm = log_(beta * q + (T(1) - beta) * p);
    const T kl_pm = unless_zero(p, p * (ls - lm));
    const T kl_qm = unless_zero(q, q * (lt - lm));
    return {beta * kl_qm + (T(1) - beta) * kl_pm, kl_pm};
  }
}

// d divergence / d s_c for the row statistic R = aux; 0 where both probabilities are 0.
template <DistillKind kKind, typename T>
FUSED_CE_HOST_DEVICE T distill_grad(T ls, T lt, T beta, T aux) {
  if constexpr (kKind == DistillKind::kForwardKL) {
    return exp_(ls) - exp_(lt);
  } else if constexpr (kKind == DistillKind::kReverseKL) {
    const T p = exp_(ls);
    return unless_zero(p, p * ((ls - lt) - aux));
  } else {
    const T p = exp_(ls), q = exp_(lt);
    const T lm = log_(beta * q + (T(1) - beta) * p);
    return unless_zero(p, (T(1) - beta) * p * ((ls - lm) - aux));
  }
}

}  // namespace fused_ce
