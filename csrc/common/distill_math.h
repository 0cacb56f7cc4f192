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
#pragma once

#include <cstdint>

#include "common/ce_math.h"

namespace fused_ce {

enum class DistillKind : int64_t { kForwardKL = 0, kReverseKL = 1, kJSD = 2 };

// What one divergence term needs: the log-probabilities of both rows at one class.
template <typename T>
struct DistillTerm {
  T value;      // this class's term of the divergence
  T aux;        // this class's term of R (see above)
  T log_ratio;  // r_c
};

// The terms at one class; beta is used by the JSD only.
template <typename T>
FUSED_CE_HOST_DEVICE DistillTerm<T> distill_term(DistillKind kind, T ls, T lt, T beta) {
  const T p = exp_(ls), q = exp_(lt);
  if (kind == DistillKind::kForwardKL) {
    const T v = q == T(0) ? T(0) : q * (lt - ls);
    return {v, T(0), T(0)};
  }
  if (kind == DistillKind::kReverseKL) {
    const T r = ls - lt;
    const T v = p == T(0) ? T(0) : p * r;
    return {v, v, r};
  }
  const T m = beta * q + (T(1) - beta) * p;
  const T lm = log_(m);
  const T kl_pm = p == T(0) ? T(0) : p * (ls - lm);
  const T kl_qm = q == T(0) ? T(0) : q * (lt - lm);
  return {beta * kl_qm + (T(1) - beta) * kl_pm, kl_pm, ls - lm};
}

// d divergence / d s_c for the row statistic R (see above); 0 where p and q are 0.
template <typename T>
FUSED_CE_HOST_DEVICE T distill_grad(DistillKind kind, T ls, T lt, T beta, T aux) {
  const T p = exp_(ls), q = exp_(lt);
  if (kind == DistillKind::kForwardKL) return p - q;
  if (p == T(0)) return T(0);
  if (kind == DistillKind::kReverseKL) return p * ((ls - lt) - aux);
  const T lm = log_(beta * q + (T(1) - beta) * p);
  return (T(1) - beta) * p * ((ls - lm) - aux);
}

}  // namespace fused_ce
