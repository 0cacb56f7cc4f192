// CPU kernels of the distillation losses (common/distill_math.h), compiled once per
// instruction set like kernels.cpp. Rows run in parallel; each row of the student
// and the teacher is read in blocks that stay in L1 between a max pass and an
// exp-sum pass, which merge into the two rows' online log-sum-exps; a second pass
// over the row (from L2) sums the divergence's terms, and backward writes the
// student's gradient in one more.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/distill_math.h"
#include "cpu/kernels.h"
#include "cpu/vec.h"

#ifndef CPU_CAPABILITY
#error "distill.cpp is compiled once per CPU_CAPABILITY by setup.py"
#endif

namespace fused_ce::cpu {
namespace CPU_CAPABILITY {
namespace {

// x / T for a block of n logits into buf (acc dtype), padded with -inf to whole vectors.
template <typename scalar_t, typename acc_t>
int64_t load_scaled(const scalar_t* x, int64_t n, acc_t inv_t, acc_t* buf) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  int64_t j = 0;
  for (; j < n; ++j) buf[j] = static_cast<acc_t>(x[j]) * inv_t;
  for (; j % W; ++j) buf[j] = neg_inf<acc_t>();
  return j;
}

// The online log-sum-exp of a row's block: (max, sum of exp(v - max)).
template <typename acc_t>
RowStats<acc_t> block_lse(const acc_t* v, int64_t padded) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  Vec vmax(neg_inf<acc_t>());
  for (int64_t j = 0; j < padded; j += W) vmax = at::vec::maximum(vmax, Vec::loadu(v + j));
  RowStats<acc_t> s = empty_row_stats<acc_t>();
  s.max = reduce_max(vmax);
  if (s.max == neg_inf<acc_t>()) return s;
  if (!std::isfinite(s.max)) {  // NaN or +inf: the row's lse is NaN, as in PyTorch
    s.sum = std::numeric_limits<acc_t>::quiet_NaN();
    return s;
  }
  const Vec m(s.max);
  Vec vsum(0);
  for (int64_t j = 0; j < padded; j += W) {
    const Vec e = Vec::loadu(v + j) - m;
    vsum += exp_bounded(e);
  }
  s.sum = reduce_sum(vsum);
  return s;
}

template <typename scalar_t>
struct Rows {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t W = Vec::size();
  const scalar_t* student;
  const scalar_t* teacher;
  int64_t student_stride, teacher_stride, num_classes;
  acc_t inv_t, beta;

  explicit Rows(const DistillArgs& a)
      : student(a.student.const_data_ptr<scalar_t>()),
        teacher(a.teacher.const_data_ptr<scalar_t>()),
        student_stride(a.student.stride(0)),
        teacher_stride(a.teacher.stride(0)),
        num_classes(a.student.size(1)),
        inv_t(acc_t(1.0 / a.temperature)),
        beta(acc_t(a.beta)) {}

  // (lse of the student's scaled row, lse of the teacher's).
  std::pair<acc_t, acc_t> lses(int64_t i, acc_t* s, acc_t* t) const {
    RowStats<acc_t> ss = empty_row_stats<acc_t>(), st = empty_row_stats<acc_t>();
    for (int64_t b = 0; b < num_classes; b += kBlock) {
      const int64_t n = std::min(kBlock, num_classes - b);
      ss = merge(ss, block_lse(s, load_scaled(student + i * student_stride + b, n, inv_t, s)));
      st = merge(st, block_lse(t, load_scaled(teacher + i * teacher_stride + b, n, inv_t, t)));
    }
    return {row_lse(ss), row_lse(st)};
  }

  // Calls f(j0, ls, lt) for each vector of log-probabilities of row i (j0: its first class;
  // the last vector of a block is padded with -inf, whose probability is 0).
  template <typename F>
  void for_each_vec(int64_t i, acc_t lse_s, acc_t lse_t, acc_t* s, acc_t* t, F f) const {
    const Vec vls(lse_s), vlt(lse_t);
    for (int64_t b = 0; b < num_classes; b += kBlock) {
      const int64_t n = std::min(kBlock, num_classes - b);
      const int64_t padded = load_scaled(student + i * student_stride + b, n, inv_t, s);
      load_scaled(teacher + i * teacher_stride + b, n, inv_t, t);
      for (int64_t j = 0; j < padded; j += W) f(b + j, Vec::loadu(s + j) - vls, Vec::loadu(t + j) - vlt);
    }
  }
};

// Turns the runtime kind into the template argument of the formulas.
template <typename Fn>
void with_kind(int64_t kind, Fn&& fn) {
  switch (static_cast<DistillKind>(kind)) {
    case DistillKind::kForwardKL: fn(std::integral_constant<DistillKind, DistillKind::kForwardKL>{}); break;
    case DistillKind::kReverseKL: fn(std::integral_constant<DistillKind, DistillKind::kReverseKL>{}); break;
    default: fn(std::integral_constant<DistillKind, DistillKind::kJSD>{}); break;
  }
}

template <typename scalar_t>
void distill_forward_impl(const DistillArgs& args, at::Tensor& loss_out, at::Tensor& aux_out, at::Tensor& lse_s_out,
                          at::Tensor& lse_t_out) {
  using R = Rows<scalar_t>;
  using acc_t = typename R::acc_t;
  using Vec = typename R::Vec;
  const R rows(args);
  acc_t* loss = loss_out.data_ptr<acc_t>();
  acc_t* aux = aux_out.data_ptr<acc_t>();
  acc_t* lse_s = lse_s_out.data_ptr<acc_t>();
  acc_t* lse_t = lse_t_out.data_ptr<acc_t>();
  const int64_t N = args.student.size(0);
  with_kind(args.kind, [&](auto kind) {
    constexpr DistillKind kKind = decltype(kind)::value;
    at::parallel_for(0, N, grain_rows(rows.num_classes), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> s(kBlock), t(kBlock);
      const Vec vbeta(rows.beta);
      for (int64_t i = begin; i < end; ++i) {
        const auto [ls, lt] = rows.lses(i, s.data(), t.data());
        Vec value(0), r(0);
        rows.for_each_vec(i, ls, lt, s.data(), t.data(), [&](int64_t, const Vec& a, const Vec& b) {
          const DistillTerm<Vec> term = distill_term<kKind>(a, b, vbeta);
          value += term.value;
          r += term.aux;
        });
        loss[i] = reduce_sum(value);
        aux[i] = reduce_sum(r);
        lse_s[i] = ls;
        lse_t[i] = lt;
      }
    });
  });
}

template <typename scalar_t>
void distill_backward_impl(const DistillArgs& args, const at::Tensor& aux_in, const at::Tensor& lse_s_in,
                           const at::Tensor& lse_t_in, const at::Tensor& grad_loss_in, at::Tensor& grad_out) {
  using R = Rows<scalar_t>;
  using acc_t = typename R::acc_t;
  using Vec = typename R::Vec;
  const R rows(args);
  const acc_t* aux = aux_in.const_data_ptr<acc_t>();
  const acc_t* lse_s = lse_s_in.const_data_ptr<acc_t>();
  const acc_t* lse_t = lse_t_in.const_data_ptr<acc_t>();
  const acc_t* grad_loss = grad_loss_in.const_data_ptr<acc_t>();
  const int64_t g_stride = grad_loss_in.stride(0);
  scalar_t* grad = grad_out.data_ptr<scalar_t>();
  const int64_t N = args.student.size(0), V = rows.num_classes;
  with_kind(args.kind, [&](auto kind) {
    constexpr DistillKind kKind = decltype(kind)::value;
    at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> s(kBlock), t(kBlock);
      const Vec vbeta(rows.beta);
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* g = grad + i * V;
        const acc_t scale = grad_loss[i * g_stride] * rows.inv_t;
        if (scale == acc_t(0)) {  // a masked row, or a zero upstream gradient
          std::fill(g, g + V, scalar_t(0));
          continue;
        }
        const Vec vscale(scale), vaux(aux[i]);
        rows.for_each_vec(i, lse_s[i], lse_t[i], s.data(), t.data(), [&](int64_t c, const Vec& a, const Vec& b) {
          store_vec<scalar_t>(vscale * distill_grad<kKind>(a, b, vbeta, vaux), g + c, std::min(R::W, V - c));
        });
      }
    });
  });
}

}  // namespace

void distill_forward(const DistillArgs& args, at::Tensor& loss, at::Tensor& aux, at::Tensor& lse_student,
                     at::Tensor& lse_teacher) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.student.scalar_type(), "fused_ce_distill_forward_cpu",
                                  [&] { distill_forward_impl<scalar_t>(args, loss, aux, lse_student, lse_teacher); });
}

void distill_backward(const DistillArgs& args, const at::Tensor& aux, const at::Tensor& lse_student,
                      const at::Tensor& lse_teacher, const at::Tensor& grad_loss, at::Tensor& grad_student) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, args.student.scalar_type(), "fused_ce_distill_backward_cpu",
      [&] { distill_backward_impl<scalar_t>(args, aux, lse_student, lse_teacher, grad_loss, grad_student); });
}

}  // namespace CPU_CAPABILITY
}  // namespace fused_ce::cpu
