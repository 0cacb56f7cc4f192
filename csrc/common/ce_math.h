// The cross-entropy math shared by the CPU and CUDA kernels.
//
// Every loss fused_ce computes is, per row i of logits z (V classes),
//
//     loss_i = sum_c T_c * (lse - z_c),        lse = log sum_c exp(z_c)
//
// for a target distribution T set by F.cross_entropy's options:
//
//     T_c = w_c * (on_target * q_c + smoothing)
//       q         = onehot(y_i) for class-index targets, the target row for probabilities
//       on_target = 1 - label_smoothing,   smoothing = label_smoothing / V
//       w         = the class weights (all ones without `weight`)
//
// and its gradient is  d loss_i / d z_c = mass * softmax_c - T_c  with mass = sum_c T_c.
// Backward scales the two terms by per-row coefficients:
//
//     grad_c = p_coef * softmax_c - t_coef * T_c
//       p_coef = dL/dloss_i * mass + dL/dlse_i,   t_coef = dL/dloss_i
//
// which covers every reduction, z-loss (through dL/dlse) and a differentiable lse.
//
// This header is plain C++ usable from host and device code; the functions are
// templates over the accumulation type (float, or double for float64 inputs).
#pragma once

#include <cmath>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FUSED_CE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FUSED_CE_HOST_DEVICE inline
#endif

namespace fused_ce {

// The parameters of T that are the same for every row.
struct TargetSpec {
  double on_target;  // 1 - label_smoothing
  double smoothing;  // label_smoothing / V
};

template <typename acc_t>
FUSED_CE_HOST_DEVICE acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// Running statistics of a row, or of a part of it, relative to its running max:
//
//     sum  = sum_c exp(z_c - max)          so that lse = max + log(sum)
//     mass = sum_c T_c
//     gap  = sum_c T_c * (max - z_c)       (every term >= 0)
//
// Then loss = mass * log(sum) + gap: two non-negative terms, so a confident
// prediction (loss -> 0) keeps full relative precision, where mass*lse - sum T z
// would cancel. Parts merge exactly like the online log-sum-exp.
template <typename acc_t>
struct RowStats {
  acc_t max;
  acc_t sum;
  acc_t mass;
  acc_t gap;
};

template <typename acc_t>
FUSED_CE_HOST_DEVICE RowStats<acc_t> empty_row_stats() {
  return {neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0)};
}

// On the GPU only exp of float uses the hardware approximation (__expf: ex2.approx,
// a few ulp; one special-function op per logit keeps the kernels memory-bound). The
// rest is IEEE: the build uses no --use_fast_math, whose tanh.approx (softcap) and
// approximate division cost 1e-5 relative error, and no FMA contraction (--fmad=false),
// so the same formula rounds alike in every CUDA kernel -- the fused and the
// recomputed gradients agree bit for bit. (The CPU kernels agree among themselves;
// they use at::vec's exp_u20 and may contract, so CPU and GPU differ in the last bits.)
FUSED_CE_HOST_DEVICE float exp_(float x) {
#ifdef __CUDA_ARCH__
  return __expf(x);
#else
  return expf(x);
#endif
}
FUSED_CE_HOST_DEVICE double exp_(double x) { return exp(x); }
FUSED_CE_HOST_DEVICE float log_(float x) { return logf(x); }
FUSED_CE_HOST_DEVICE double log_(double x) { return log(x); }
FUSED_CE_HOST_DEVICE float tanh_(float x) { return tanhf(x); }
FUSED_CE_HOST_DEVICE double tanh_(double x) { return tanh(x); }
// at::vec::Vectorized on the CPU.
template <typename Vec>
inline Vec tanh_(const Vec& x) {
  return x.tanh();
}

// Re-expresses `s` relative to a new running max (new_max >= s.max).
template <typename acc_t>
FUSED_CE_HOST_DEVICE RowStats<acc_t> rescale(RowStats<acc_t> s, acc_t new_max) {
  if (s.max == new_max) return s;  // also covers -inf == -inf
  // An empty part (max = -inf) has sum = mass = gap = 0 and stays so.
  if (s.max != neg_inf<acc_t>()) s.sum *= exp_(s.max - new_max);
  if (s.mass != acc_t(0)) s.gap += s.mass * (new_max - s.max);
  s.max = new_max;
  return s;
}

// max(a, b) that returns NaN if either is NaN (as PyTorch's reductions do; fmax drops it).
template <typename acc_t>
FUSED_CE_HOST_DEVICE acc_t nan_max(acc_t a, acc_t b) {
  return (a != a || b != b) ? a + b : (a > b ? a : b);
}

// Online log-sum-exp merge of two parts of a row.
template <typename acc_t>
FUSED_CE_HOST_DEVICE RowStats<acc_t> merge(RowStats<acc_t> a, RowStats<acc_t> b) {
  const acc_t m = nan_max(a.max, b.max);
  a = rescale(a, m);
  b = rescale(b, m);
  return {m, a.sum + b.sum, a.mass + b.mass, a.gap + b.gap};
}

// The contribution T * (max - z) of one target entry; 0 when T is 0 (as xlogy
// defines 0 * log 0), so masked logits (-inf) outside the target stay harmless.
// (PyTorch computes 0 * inf = NaN for a zero class weight or a zero probability
// on a -inf logit: a documented difference.)
template <typename acc_t>
FUSED_CE_HOST_DEVICE acc_t target_gap(acc_t t, acc_t row_max, acc_t z) {
  return t == acc_t(0) ? acc_t(0) : t * (row_max - z);
}

// Adds one target entry T_c (at logit z) to stats whose max is final.
template <typename acc_t>
FUSED_CE_HOST_DEVICE void add_target(RowStats<acc_t>& s, acc_t t, acc_t z) {
  s.mass += t;
  s.gap += target_gap(t, s.max, z);
}

template <typename acc_t>
FUSED_CE_HOST_DEVICE acc_t row_lse(const RowStats<acc_t>& s) {
  return s.max + log_(s.sum);
}

// The loss of a row that is not ignored (an ignored row's is 0, whatever its
// logits hold: the kernels write that themselves). A row whose logits are all -inf
// has no softmax: NaN, as in PyTorch, also where the target mass is 0; and as in
// PyTorch a NaN logit makes even a zero-mass row NaN (0 * NaN).
template <typename acc_t>
FUSED_CE_HOST_DEVICE acc_t row_loss(const RowStats<acc_t>& s) {
  if (s.max == neg_inf<acc_t>()) return s.max - s.max;  // NaN
  return s.mass * log_(s.sum) + s.gap;
}

FUSED_CE_HOST_DEVICE bool finite_(float x) { return std::isfinite(x); }
FUSED_CE_HOST_DEVICE bool finite_(double x) { return std::isfinite(x); }

// Whether a row's gradient is exactly 0 without computing it: no coefficient
// reaches the softmax or the target, and the softmax is finite (NaN or infinite
// logits give a NaN gradient even with zero coefficients, as PyTorch's 0 * NaN).
template <typename acc_t>
FUSED_CE_HOST_DEVICE bool gradient_is_zero(acc_t p_coef, acc_t t_coef, bool ignored, acc_t lse) {
  return p_coef == acc_t(0) && (ignored || t_coef == acc_t(0)) && finite_(lse);
}

// Entropy H = -sum_c p_c log p_c of softmax(z), online like the lse:
//
//     sum    = sum_c exp(z_c - max)
//     moment = sum_c exp(z_c - max) * (max - z_c)       (every term >= 0)
//     H      = log(sum) + moment / sum
//
// Moving to a new max m' >= m: sum' = e^(m - m') sum, moment' = e^(m - m') (moment + sum (m' - m)).
// dH/dz_c = p_c (lse - z_c - H).
template <typename acc_t>
struct EntropyStats {
  acc_t max;
  acc_t sum;
  acc_t moment;
};

template <typename acc_t>
FUSED_CE_HOST_DEVICE EntropyStats<acc_t> empty_entropy_stats() {
  return {neg_inf<acc_t>(), acc_t(0), acc_t(0)};
}

template <typename acc_t>
FUSED_CE_HOST_DEVICE EntropyStats<acc_t> rescale(EntropyStats<acc_t> s, acc_t new_max) {
  if (s.max == new_max || s.max == neg_inf<acc_t>()) {  // an empty part stays empty
    s.max = new_max;
    return s;
  }
  const acc_t f = exp_(s.max - new_max);
  s.moment = f * (s.moment + s.sum * (new_max - s.max));
  s.sum *= f;
  s.max = new_max;
  return s;
}

template <typename acc_t>
FUSED_CE_HOST_DEVICE EntropyStats<acc_t> merge(EntropyStats<acc_t> a, EntropyStats<acc_t> b) {
  const acc_t m = nan_max(a.max, b.max);
  a = rescale(a, m);
  b = rescale(b, m);
  return {m, a.sum + b.sum, a.moment + b.moment};
}

// The contribution e * (max - z) of one logit with e = exp(z - max); 0 when e is 0
// (p log p -> 0), so masked logits (-inf) add nothing rather than 0 * inf.
template <typename acc_t>
FUSED_CE_HOST_DEVICE acc_t entropy_moment(acc_t e, acc_t row_max, acc_t z) {
  return e == acc_t(0) ? acc_t(0) : e * (row_max - z);
}

template <typename acc_t>
FUSED_CE_HOST_DEVICE acc_t entropy_value(const EntropyStats<acc_t>& s) {
  return log_(s.sum) + s.moment / s.sum;
}

template <typename T>
FUSED_CE_HOST_DEVICE T entropy_grad_value(T prob, T z, T lse, T entropy, T grad_entropy) {
  return grad_entropy * prob * (lse - z - entropy);
}

// The per-row objective when the forward pass also writes the gradient: the row's
// loss scaled as its reduction needs (row_scale = 1/denominator for 'mean'), plus
// the z-loss term z_scale * lse^2. Its gradient is grad_value with
// t_coef = row_scale and p_coef = row_scale * mass + 2 * z_scale * lse.
template <typename acc_t>
FUSED_CE_HOST_DEVICE acc_t objective(acc_t loss, acc_t lse, acc_t row_scale, acc_t z_scale) {
  return row_scale * loss + (z_scale == acc_t(0) ? acc_t(0) : z_scale * lse * lse);
}

// Gemma-2 style logit soft-capping z = cap * tanh(x / cap); cap <= 0 means off.
// The templates also serve at::vec::Vectorized, which has .tanh().
template <typename T>
FUSED_CE_HOST_DEVICE T softcap_value(T x, T cap, T inv_cap) {
  return cap * tanh_(x * inv_cap);
}
// dz/dx of the soft-cap, written in terms of its output z.
template <typename T>
FUSED_CE_HOST_DEVICE T softcap_slope(T z, T inv_cap) {
  const T u = z * inv_cap;
  return T(1) - u * u;
}

// The logits the loss sees, from the input x: z = post * softcap(pre * x), with pre a
// logit scale (Cohere's, Granite's), the soft-cap of Gemma 2 (cap <= 0: off) and
// post = 1 / temperature -- the cap first, then the temperature, as a model outputs
// capped logits and sampling divides those. Without a cap it is one multiply by
// pre * post. Every member is exact for the identity (pre = post = 1), so results
// without a scale or a temperature are bitwise those of the soft-cap alone.
template <typename acc_t>
struct LogitMap {
  acc_t pre = 1, post = 1, cap = 0, inv_cap = 0;

  FUSED_CE_HOST_DEVICE bool identity() const { return pre == acc_t(1) && post == acc_t(1) && !(cap > acc_t(0)); }

  template <typename T>
  FUSED_CE_HOST_DEVICE T value(T x) const {
    return cap > acc_t(0) ? T(post) * softcap_value(x * T(pre), T(cap), T(inv_cap)) : x * T(pre * post);
  }
  // dz/dx, written in terms of z.
  template <typename T>
  FUSED_CE_HOST_DEVICE T slope(T z) const {
    return cap > acc_t(0) ? T(pre * post) * softcap_slope(z, T(inv_cap / post)) : T(pre * post);
  }
};

template <typename acc_t>
inline LogitMap<acc_t> make_logit_map(double logit_scale, double softcap, double temperature) {
  LogitMap<acc_t> m;
  m.pre = acc_t(logit_scale);
  m.post = acc_t(1.0 / temperature);
  m.cap = softcap > 0 ? acc_t(softcap) : acc_t(0);
  m.inv_cap = softcap > 0 ? acc_t(1.0 / softcap) : acc_t(0);
  return m;
}

// One gradient entry before the soft-cap chain rule: p_coef * softmax_c - t_coef * T_c.
template <typename T>
FUSED_CE_HOST_DEVICE T grad_value(T prob, T t, T p_coef, T t_coef) {
  return p_coef * prob - t_coef * t;
}

}  // namespace fused_ce
