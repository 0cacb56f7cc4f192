// CPU kernels, compiled once per instruction set: setup.py builds this file with
// CPU_CAPABILITY set to DEFAULT, AVX2 and AVX512 (and the matching -m flags), so
// at::vec::Vectorized is the real SIMD type in each copy.
//
// Rows run in parallel (at::parallel_for). A row is processed in blocks of
// kBlock entries: float32/float64 blocks of whole vectors without a soft-cap are
// read where they are, others converted to an fp32 (fp64 for double) copy in L1;
// one pass takes its max and a second its exp-sum and target sums, and the
// block's statistics merge into the row's by the online log-sum-exp
// (common/ce_math.h). Each logit is read from memory once and needs one exp.
#include "cpu/kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/vec.h"

#ifndef CPU_CAPABILITY
#error "kernels.cpp is compiled once per CPU_CAPABILITY by setup.py"
#endif

namespace fused_ce::cpu {
namespace CPU_CAPABILITY {
namespace {

// z = map(x) (common/ce_math.h: scale, soft-cap, temperature) for n entries into buf,
// padded with -inf to whole vectors; returns the padded length.
template <typename scalar_t>
int64_t load_logits_block(const scalar_t* x, int64_t n, acc_type<scalar_t>* buf,
                          const LogitMap<acc_type<scalar_t>>& map) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    Vec z = load_vec(x + j);
    if (!map.identity()) z = map.value(z);
    z.store(buf + j);
  }
  for (; j < n; ++j) {
    const acc_t v = static_cast<acc_t>(x[j]);
    buf[j] = map.identity() ? v : map.value(v);
  }
  for (; j % W; ++j) buf[j] = neg_inf<acc_t>();
  return j;
}

// The running argmax of a row: the lowest index among ties, a NaN the largest (torch.argmax).
template <typename acc_t>
struct Best {
  acc_t value = neg_inf<acc_t>();
  int64_t index = 0;

  // A block's values v[0, n) (padded with -inf to whole vectors) at classes [first,
  // first + n), whose max is block_max: the first class holding it (a NaN max: the first
  // NaN) replaces the best if larger. Only a block that beats the best is searched --
  // a few per row -- and a finite max a vector at a time.
  void take_block(const acc_t* v, int64_t n, int64_t first, acc_t block_max) {
    using Vec = Vectorized<acc_t>;
    const bool block_nan = block_max != block_max;
    if (value != value || !(block_nan || block_max > value)) return;  // a NaN stays; ties keep the earlier
    int64_t j = 0;
    if (std::isfinite(block_max)) {
      const Vec m(block_max);
      for (; j < n; j += Vec::size()) {
        const int lanes = (Vec::loadu(v + j) - m).zero_mask();  // x - max == 0 exactly where x == max
        if (lanes) {
          j += __builtin_ctz(lanes);
          break;
        }
      }
    } else {
      while (j < n && !(block_nan ? v[j] != v[j] : v[j] == block_max)) ++j;
    }
    value = v[j];
    index = first + j;
  }
};

// What one call needs, hoisted out of the row loop. T_c (common/ce_math.h) is
// split into its one-hot part (class-index targets: added once per row, at y)
// and its spread part (smoothing, or probability targets), summed over blocks.
template <typename scalar_t>
struct Problem {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kWidth = Vec::size();

  const scalar_t* logits;
  int64_t logits_stride;
  int64_t num_classes;
  const int64_t* target_index = nullptr;   // class-index targets
  const scalar_t* target_probs = nullptr;  // probability targets
  int64_t target_stride = 0;
  const acc_t* weight = nullptr;
  int64_t ignore_index;
  int64_t vocab_start;  // class-index targets are global: this slice holds [vocab_start, vocab_start + V)
  acc_t on_target, smoothing;
  LogitMap<acc_t> map;  // the logits the loss sees (scale, soft-cap, temperature)

  explicit Problem(const KernelArgs& a)
      : logits(a.logits.const_data_ptr<scalar_t>()),
        logits_stride(a.logits.stride(0)),
        num_classes(a.logits.size(1)),
        ignore_index(a.ignore_index),
        vocab_start(a.vocab.start),
        on_target(a.spec.on_target),
        smoothing(a.spec.smoothing),
        map(make_logit_map<acc_t>(a.logit_scale, a.softcap, a.temperature)) {
    if (a.target.is_floating_point()) {
      target_probs = a.target.const_data_ptr<scalar_t>();
      target_stride = a.target.stride(0);
    } else {
      target_index = a.target.const_data_ptr<int64_t>();
    }
    if (a.weight.defined()) weight = a.weight.const_data_ptr<acc_t>();
  }

  // Per-row view of the target.
  struct Row {
    int64_t index;  // class-index target within this slice, or -1 (none, ignored, or in another slice)
    bool ignored;   // loss and T are 0
    bool spread;    // T has a part beyond the one-hot entry
    const scalar_t* probs;
  };

  Row row(int64_t i) const {
    if (target_probs) return {-1, false, true, target_probs + i * target_stride};
    const int64_t y = target_index[i];
    const bool ignored = y == ignore_index;
    const int64_t local = y - vocab_start;
    const bool here = !ignored && local >= 0 && local < num_classes;
    return {here ? local : -1, ignored, !ignored && smoothing != acc_t(0), nullptr};
  }

  acc_t logit(const scalar_t* x, int64_t c) const {
    const acc_t v = static_cast<acc_t>(x[c]);
    return map.identity() ? v : map.value(v);
  }

  acc_t class_weight(int64_t c) const { return weight ? weight[c] : acc_t(1); }

  // Whether a block of n logits can be read where it is: already in the accumulation
  // dtype, the logits themselves (no scale, soft-cap or temperature), whole vectors
  // (else load_logits copies it, padded, to L1).
  bool reads_in_place(int64_t n) const { return std::is_same_v<scalar_t, acc_t> && map.identity() && n % kWidth == 0; }

  int64_t load_logits(const scalar_t* x, int64_t n, acc_t* buf) const { return load_logits_block(x, n, buf, map); }

  // The spread part of T for classes [b, b + n), padded with 0.
  void load_spread_targets(const Row& r, int64_t b, int64_t n, acc_t* buf) const {
    int64_t j = 0;
    if (r.probs) {
      for (; j < n; ++j) buf[j] = class_weight(b + j) * (on_target * static_cast<acc_t>(r.probs[b + j]) + smoothing);
    } else if (weight) {
      for (; j < n; ++j) buf[j] = smoothing * weight[b + j];
    } else {
      for (; j < n; ++j) buf[j] = smoothing;
    }
    for (; j % kWidth; ++j) buf[j] = acc_t(0);
  }

  // Statistics of one block: z[padded], spread targets t[padded] or nullptr.
  static RowStats<acc_t> block_stats(const acc_t* z, const acc_t* t, int64_t padded) {
    Vec vmax(neg_inf<acc_t>());
    for (int64_t j = 0; j < padded; j += kWidth) vmax = at::vec::maximum(vmax, Vec::loadu(z + j));
    RowStats<acc_t> s{reduce_max(vmax), acc_t(0), acc_t(0), acc_t(0)};
    if (!std::isfinite(s.max)) {
      // -inf: only -inf logits, which add nothing to the sum; target mass on them
      // makes the gap +inf once the row max is finite (see rescale).
      // NaN or +inf: the row's lse and loss are NaN, as in PyTorch.
      if (s.max != neg_inf<acc_t>()) s.sum = s.gap = std::numeric_limits<acc_t>::quiet_NaN();
      if (t) {
        Vec vmass(0);
        for (int64_t j = 0; j < padded; j += kWidth) vmass += Vec::loadu(t + j);
        s.mass = reduce_sum(vmass);
      }
      return s;
    }
    const Vec m(s.max), zero(0);
    Vec vsum(0), vmass(0), vgap(0);
    for (int64_t j = 0; j < padded; j += kWidth) {
      const Vec zj = Vec::loadu(z + j);
      vsum += exp_bounded(zj - m);
      if (t) {
        const Vec tj = Vec::loadu(t + j);
        vmass += tj;
        // target_gap: 0 where T is 0, so -inf logits (and padding) outside the target add nothing.
        vgap += Vec::blendv(tj * (m - zj), zero, tj == zero);
      }
    }
    s.sum = reduce_sum(vsum);
    if (t) {
      s.mass = reduce_sum(vmass);
      s.gap = reduce_sum(vgap);
    }
    return s;
  }

  // Statistics of a whole row; zy is the (soft-capped) logit of a class-index target.
  // With best, also the row's argmax (see ArgmaxOutputs).
  RowStats<acc_t> row_stats(const Row& r, const scalar_t* x, acc_t zy, acc_t* z, acc_t* t,
                            Best<acc_t>* best = nullptr) const {
    RowStats<acc_t> st = empty_row_stats<acc_t>();
    for (int64_t b = 0; b < num_classes; b += kBlock) {
      const int64_t n = std::min(kBlock, num_classes - b);
      const acc_t* zb = z;
      int64_t padded;
      if (reads_in_place(n)) {  // the logits are the z values already: no copy
        zb = reinterpret_cast<const acc_t*>(x + b);
        padded = n;
      } else {
        padded = load_logits(x + b, n, z);
      }
      if (r.spread) load_spread_targets(r, b, n, t);
      const RowStats<acc_t> block = block_stats(zb, r.spread ? t : nullptr, padded);
      if (best) best->take_block(zb, n, b, block.max);
      st = merge(st, block);
    }
    if (r.index >= 0) add_target(st, on_target * class_weight(r.index), zy);
    return st;
  }

  // Writes the row's gradient p_coef * softmax - t_coef * T (times the soft-cap
  // slope) to g. g may be x itself (in place): each vector of a block is read (or
  // the block copied to z) before its gradient is written, and zy was read before any.
  void row_grad(const Row& r, const scalar_t* x, scalar_t* g, acc_t zy, acc_t lse, acc_t pc, acc_t tc, acc_t* z,
                acc_t* t) const {
    if (gradient_is_zero(pc, tc, r.ignored, lse)) {
      // Nothing flows into this row (an ignored row, or a zero upstream gradient).
      std::fill(g, g + num_classes, scalar_t(0));
      return;
    }
    // A NaN or infinite lse (NaN or +inf logits, or only -inf ones) makes the
    // row's softmax NaN, as in PyTorch; otherwise exp's arguments are <= 0.
    const bool finite_lse = std::isfinite(lse);
    const Vec vlse(lse), vpc(pc), vtc(tc), zero(0);
    const Vec nan(std::numeric_limits<acc_t>::quiet_NaN());
    for (int64_t b = 0; b < num_classes; b += kBlock) {
      const int64_t n = std::min(kBlock, num_classes - b);
      // In place (g == x), a vector of x is read before the same vector of g is written.
      const acc_t* zb = z;
      if (reads_in_place(n)) {
        zb = reinterpret_cast<const acc_t*>(x + b);
      } else {
        load_logits(x + b, n, z);
      }
      if (r.spread) load_spread_targets(r, b, n, t);
      for (int64_t j = 0; j < n; j += kWidth) {
        const Vec zj = Vec::loadu(zb + j);
        const Vec tj = r.spread ? Vec::loadu(t + j) : zero;
        Vec gj = grad_value(finite_lse ? exp_bounded(zj - vlse) : nan, tj, vpc, vtc);
        if (!map.identity()) gj = gj * map.slope(zj);
        store_vec(gj, g + b + j, std::min(kWidth, n - j));
      }
    }
    if (r.index >= 0) {
      // The one-hot entry, written again with the whole of T_y.
      const int64_t y = r.index;
      const acc_t ty = class_weight(y) * (on_target + (r.spread ? smoothing : acc_t(0)));
      const acc_t py = finite_lse ? exp_(zy - lse) : std::numeric_limits<acc_t>::quiet_NaN();
      acc_t gy = grad_value(py, ty, pc, tc);
      if (!map.identity()) gy *= map.slope(zy);
      g[y] = static_cast<scalar_t>(gy);
    }
  }
};

template <typename scalar_t>
void forward_impl(const KernelArgs& args, at::Tensor& loss_out, at::Tensor& lse_out, at::Tensor& mass_out,
                  const GradInForward* with_grad, const ArgmaxOutputs* argmax) {
  using P = Problem<scalar_t>;
  using acc_t = typename P::acc_t;
  const P p(args);
  acc_t* loss = loss_out.data_ptr<acc_t>();
  acc_t* lse = lse_out.data_ptr<acc_t>();
  acc_t* mass = mass_out.defined() ? mass_out.data_ptr<acc_t>() : nullptr;
  const acc_t* row_scale = with_grad ? with_grad->row_scale.const_data_ptr<acc_t>() : nullptr;
  const acc_t* z_scale =
      with_grad && with_grad->z_scale.defined() ? with_grad->z_scale.const_data_ptr<acc_t>() : nullptr;
  scalar_t* grad = with_grad ? with_grad->grad.data_ptr<scalar_t>() : nullptr;
  const int64_t grad_stride = with_grad ? with_grad->grad.stride(0) : 0;
  int64_t* argmax_index = argmax ? argmax->index.data_ptr<int64_t>() : nullptr;
  acc_t* argmax_value = argmax ? argmax->value.data_ptr<acc_t>() : nullptr;
  const int64_t N = args.logits.size(0), V = p.num_classes;
  at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> z(kBlock), t(kBlock);
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* x = p.logits + i * p.logits_stride;
      const auto r = p.row(i);
      const acc_t zy = r.index >= 0 ? p.logit(x, r.index) : acc_t(0);
      Best<acc_t> best;
      const RowStats<acc_t> st = p.row_stats(r, x, zy, z.data(), t.data(), argmax ? &best : nullptr);
      if (argmax) {
        argmax_index[i] = best.index;
        argmax_value[i] = best.value;
      }
      const acc_t row_lse_i = row_lse(st), row_loss_i = r.ignored ? acc_t(0) : row_loss(st);
      lse[i] = row_lse_i;
      if (mass) mass[i] = st.mass;
      if (!grad) {
        loss[i] = row_loss_i;
        continue;
      }
      const acc_t s = row_scale[i], zs = z_scale ? z_scale[i] : acc_t(0);
      loss[i] = objective(row_loss_i, row_lse_i, s, zs);
      p.row_grad(r, x, grad + i * grad_stride, zy, row_lse_i, s * st.mass + 2 * zs * row_lse_i, s, z.data(), t.data());
    }
  });
}

template <typename scalar_t>
void backward_impl(const KernelArgs& args, const at::Tensor& lse_in, const at::Tensor& p_coef_in,
                   const at::Tensor& t_coef_in, const at::Tensor& keep_where_one, at::Tensor& grad_out) {
  using P = Problem<scalar_t>;
  using acc_t = typename P::acc_t;
  const P p(args);
  const acc_t* lse = lse_in.const_data_ptr<acc_t>();
  const acc_t* p_coefs = p_coef_in.const_data_ptr<acc_t>();
  const acc_t* t_coefs = t_coef_in.const_data_ptr<acc_t>();
  const acc_t* keep = keep_where_one.defined() ? keep_where_one.const_data_ptr<acc_t>() : nullptr;
  const int64_t keep_stride = keep ? keep_where_one.stride(0) : 0;
  scalar_t* grad = grad_out.data_ptr<scalar_t>();
  const int64_t grad_stride = grad_out.stride(0);
  const int64_t N = args.logits.size(0), V = p.num_classes;
  at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> z(kBlock), t(kBlock);
    for (int64_t i = begin; i < end; ++i) {
      if (keep && keep[i * keep_stride] == acc_t(1)) continue;  // the row already holds its gradient
      const scalar_t* x = p.logits + i * p.logits_stride;
      const auto r = p.row(i);
      const acc_t zy = r.index >= 0 ? p.logit(x, r.index) : acc_t(0);
      p.row_grad(r, x, grad + i * grad_stride, zy, lse[i], p_coefs[i], t_coefs[i], z.data(), t.data());
    }
  });
}

// Entropy of softmax rows (see EntropyStats in common/ce_math.h), block by block
// like the cross-entropy statistics.
template <typename scalar_t>
void entropy_forward_impl(const at::Tensor& logits, double temperature, at::Tensor& entropy_out, at::Tensor& lse_out) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const scalar_t* data = logits.const_data_ptr<scalar_t>();
  acc_t* entropy = entropy_out.data_ptr<acc_t>();
  acc_t* lse = lse_out.data_ptr<acc_t>();
  const int64_t N = logits.size(0), V = logits.size(1), stride = logits.stride(0);
  const auto map = make_logit_map<acc_t>(1.0, 0.0, temperature);
  at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> z(kBlock);
    for (int64_t i = begin; i < end; ++i) {
      EntropyStats<acc_t> st = empty_entropy_stats<acc_t>();
      for (int64_t b = 0; b < V; b += kBlock) {
        const int64_t padded = load_logits_block(data + i * stride + b, std::min(kBlock, V - b), z.data(), map);
        Vec vmax(neg_inf<acc_t>());
        for (int64_t j = 0; j < padded; j += W) vmax = at::vec::maximum(vmax, Vec::loadu(z.data() + j));
        EntropyStats<acc_t> blk{reduce_max(vmax), acc_t(0), acc_t(0)};
        if (blk.max == neg_inf<acc_t>()) continue;  // only -inf: probability 0, nothing to add
        if (!std::isfinite(blk.max)) {              // NaN or +inf: NaN, as in PyTorch
          blk.sum = blk.moment = std::numeric_limits<acc_t>::quiet_NaN();
        } else {
          const Vec m(blk.max), zero(0);
          Vec vsum(0), vmoment(0);
          for (int64_t j = 0; j < padded; j += W) {
            const Vec zj = Vec::loadu(z.data() + j);
            const Vec e = exp_bounded(zj - m);
            vsum += e;
            vmoment += Vec::blendv(e * (m - zj), zero, e == zero);  // entropy_moment
          }
          blk.sum = reduce_sum(vsum);
          blk.moment = reduce_sum(vmoment);
        }
        st = merge(st, blk);
      }
      entropy[i] = entropy_value(st);
      lse[i] = st.max + std::log(st.sum);
    }
  });
}

template <typename scalar_t>
void entropy_backward_impl(const at::Tensor& logits, double temperature, const at::Tensor& entropy_in,
                           const at::Tensor& lse_in, const at::Tensor& grad_entropy_in, at::Tensor& grad_out) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const scalar_t* data = logits.const_data_ptr<scalar_t>();
  const acc_t* entropy = entropy_in.const_data_ptr<acc_t>();
  const acc_t* lse = lse_in.const_data_ptr<acc_t>();
  const acc_t* grad_entropy = grad_entropy_in.const_data_ptr<acc_t>();
  const int64_t g_stride = grad_entropy_in.stride(0);
  scalar_t* grad = grad_out.data_ptr<scalar_t>();
  const int64_t N = logits.size(0), V = logits.size(1), stride = logits.stride(0);
  const auto map = make_logit_map<acc_t>(1.0, 0.0, temperature);
  at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> z(kBlock);
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* g = grad + i * V;
      const acc_t gi = grad_entropy[i * g_stride] * map.post;  // dz/dx = 1 / temperature
      if (gi == acc_t(0)) {
        std::fill(g, g + V, scalar_t(0));
        continue;
      }
      const bool finite = std::isfinite(lse[i]) && std::isfinite(entropy[i]);
      const Vec vlse(lse[i]), vh(entropy[i]), vg(gi), zero(0), nan(std::numeric_limits<acc_t>::quiet_NaN());
      for (int64_t b = 0; b < V; b += kBlock) {
        const int64_t n = std::min(kBlock, V - b);
        load_logits_block(data + i * stride + b, n, z.data(), map);
        for (int64_t j = 0; j < n; j += W) {
          const Vec zj = Vec::loadu(z.data() + j);
          const Vec p = finite ? exp_bounded(zj - vlse) : nan;
          // p = 0 (a -inf logit) has gradient 0, not 0 * inf.
          const Vec gj = Vec::blendv(entropy_grad_value(p, zj, vlse, vh, vg), zero, p == zero);
          store_vec(gj, g + b + j, std::min(W, n - j));
        }
      }
    }
  });
}

template <typename scalar_t>
void scale_rows_impl(at::Tensor& rows, const at::Tensor& scale) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  scalar_t* data = rows.data_ptr<scalar_t>();
  const acc_t* s = scale.const_data_ptr<acc_t>();
  const int64_t N = rows.size(0), V = rows.size(1), stride = rows.stride(0), s_stride = scale.stride(0);
  at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t factor = s[i * s_stride];
      if (factor == acc_t(1)) continue;  // a plain loss.backward(): nothing to do
      scalar_t* row = data + i * stride;
      const Vec vf(factor);
      int64_t j = 0;
      for (; j + W <= V; j += W) store_vec(load_vec(row + j) * vf, row + j, W);
      for (; j < V; ++j) row[j] = static_cast<scalar_t>(static_cast<acc_t>(row[j]) * factor);
    }
  });
}

}  // namespace

void forward(const KernelArgs& args, at::Tensor& loss, at::Tensor& lse, at::Tensor& mass,
             const GradInForward* with_grad, const ArgmaxOutputs* argmax) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.logits.scalar_type(), "fused_ce_forward_cpu",
                                  [&] { forward_impl<scalar_t>(args, loss, lse, mass, with_grad, argmax); });
}

void backward(const KernelArgs& args, const at::Tensor& lse, const at::Tensor& p_coef, const at::Tensor& t_coef,
              const at::Tensor& keep_where_one, at::Tensor& grad_logits) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.logits.scalar_type(), "fused_ce_backward_cpu", [&] {
    backward_impl<scalar_t>(args, lse, p_coef, t_coef, keep_where_one, grad_logits);
  });
}

void entropy_forward(const at::Tensor& logits, double temperature, at::Tensor& entropy, at::Tensor& lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "fused_ce_entropy_forward_cpu",
                                  [&] { entropy_forward_impl<scalar_t>(logits, temperature, entropy, lse); });
}

void entropy_backward(const at::Tensor& logits, double temperature, const at::Tensor& entropy, const at::Tensor& lse,
                      const at::Tensor& grad_entropy, at::Tensor& grad) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "fused_ce_entropy_backward_cpu", [&] {
    entropy_backward_impl<scalar_t>(logits, temperature, entropy, lse, grad_entropy, grad);
  });
}

void scale_rows(at::Tensor& rows, const at::Tensor& scale) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "fused_ce_scale_rows_cpu",
                                  [&] { scale_rows_impl<scalar_t>(rows, scale); });
}

}  // namespace CPU_CAPABILITY
}  // namespace fused_ce::cpu
