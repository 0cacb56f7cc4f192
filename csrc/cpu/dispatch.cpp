// CPU registration of the fused_ce ops: argument checks, output allocation, and
// the choice of the kernels' instruction set (the one ATen itself uses, which
// honours ATEN_CPU_CAPABILITY).
#include <ATen/MemoryOverlap.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/accumulate.h>

#include <cstdlib>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <torch/library.h>

#include "common/checks.h"
#include "common/forward_ops.h"
#include "cpu/kernels.h"

namespace fused_ce::cpu {
namespace {

enum class Isa { kDefault, kAvx2, kAvx512 };

Isa kernel_isa() {
  static const Isa isa = [] {
#if defined(__x86_64__) || defined(_M_X64)
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512") return Isa::kAvx512;
    if (cap == "AVX2") return Isa::kAvx2;
#endif
    return Isa::kDefault;
  }();
  return isa;
}

#if defined(__x86_64__) || defined(_M_X64)
#define FUSED_CE_CPU_CALL(fn, ...)                     \
  switch (kernel_isa()) {                              \
    case Isa::kAvx512: AVX512::fn(__VA_ARGS__); break; \
    case Isa::kAvx2: AVX2::fn(__VA_ARGS__); break;     \
    default: DEFAULT::fn(__VA_ARGS__); break;          \
  }
#else
#define FUSED_CE_CPU_CALL(fn, ...) DEFAULT::fn(__VA_ARGS__)
#endif

// On the CPU an out-of-range class index raises (the CUDA kernels write NaN instead).
void check_target_range(const at::Tensor& target, int64_t num_classes, int64_t ignore_index) {
  if (target.is_floating_point()) return;
  const int64_t* y = target.const_data_ptr<int64_t>();
  const int64_t stride = target.stride(0);
  for (int64_t i = 0; i < target.size(0); ++i) {
    const int64_t v = y[i * stride];
    TORCH_CHECK_INDEX(v == ignore_index || (v >= 0 && v < num_classes), "target: class index ", v, " at position ", i,
                      " is out of range [0, ", num_classes, ") and is not ignore_index (", ignore_index, ")");
  }
}

KernelArgs make_args(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                     int64_t ignore_index, double label_smoothing, double softcap, int64_t vocab_start,
                     int64_t vocab_total, double logit_scale, double temperature) {
  check_forward_args(logits, target, weight, label_smoothing, softcap);
  check_logit_map(logit_scale, temperature);
  const VocabSlice vocab = vocab_slice(logits, vocab_start, vocab_total);
  check_target_range(target, vocab.total, ignore_index);
  return {logits,
          target.is_floating_point() ? target : target.contiguous(),
          weight.has_value() ? weight->contiguous() : at::Tensor(),
          ignore_index,
          target_spec(label_smoothing, vocab),
          softcap,
          vocab,
          logit_scale,
          temperature};
}

// The gradient is the one N x V buffer the ops allocate. Faulting in a fresh
// buffer 4 KB page by page costs more than the kernel that fills it
// (bench/results/cpu-2026-11-28/README.md), so large buffers are aligned to 2 MB
// and advised onto transparent huge pages. Kernels without THP ignore it.
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHugePage = size_t(2) << 20;
  const size_t nbytes = c10::multiply_integers(sizes) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (nbytes >= 16 * kHugePage) {
    const size_t rounded = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* data = std::aligned_alloc(kHugePage, rounded);
    if (data != nullptr) {
      madvise(data, rounded, MADV_HUGEPAGE);
      return at::from_blob(data, sizes, [](void* p) { std::free(p); }, options);
    }
  }
#endif
  return at::empty(sizes, options);
}

// The statistics pass: per-row (loss or objective, lse, mass) and, with_argmax, the
// row's argmax and its logit (the .stats overloads); with grad, the gradient of the
// objective written to grad in the same pass.
ForwardStats forward_into(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                          const at::Tensor* row_scale, const std::optional<at::Tensor>& z_scale, int64_t ignore_index,
                          double label_smoothing, double softcap, int64_t vocab_start, int64_t vocab_total,
                          double logit_scale, double temperature, const at::Tensor* grad, bool with_argmax) {
  const KernelArgs args = make_args(logits, target, weight, ignore_index, label_smoothing, softcap, vocab_start,
                                    vocab_total, logit_scale, temperature);
  if (grad) check_fused_args(logits, *row_scale, z_scale);
  const int64_t N = logits.size(0);
  const auto opts = logits.options().dtype(accumulate_type(logits.scalar_type()));
  at::Tensor loss = at::empty({N}, opts), lse = at::empty({N}, opts), mass = at::empty({N}, opts);
  const ArgmaxOutputs argmax{at::empty({with_argmax ? N : 0}, logits.options().dtype(at::kLong)),
                             at::empty({with_argmax ? N : 0}, opts)};
  std::optional<GradInForward> with_grad;
  if (grad) {
    with_grad =
        GradInForward{row_scale->contiguous(), z_scale.has_value() ? z_scale->contiguous() : at::Tensor(), *grad};
  }
  FUSED_CE_CPU_CALL(forward, args, loss, lse, mass, with_grad ? &*with_grad : nullptr, with_argmax ? &argmax : nullptr);
  return {loss, lse, mass, argmax.index, argmax.value};
}

std::tuple<at::Tensor, at::Tensor> entropy_forward_cpu(const at::Tensor& logits, double temperature) {
  check_entropy_args(logits);
  check_logit_map(1.0, temperature);
  const auto opts = logits.options().dtype(accumulate_type(logits.scalar_type()));
  at::Tensor entropy = at::empty({logits.size(0)}, opts);
  at::Tensor lse = at::empty({logits.size(0)}, opts);
  FUSED_CE_CPU_CALL(entropy_forward, logits, temperature, entropy, lse);
  return {entropy, lse};
}

at::Tensor entropy_backward_cpu(const at::Tensor& logits, const at::Tensor& entropy, const at::Tensor& lse,
                                const at::Tensor& grad_entropy, double temperature) {
  check_entropy_args(logits);
  check_logit_map(1.0, temperature);
  check_row_vector(entropy, "entropy", logits);
  check_row_vector(lse, "lse", logits);
  check_row_vector(grad_entropy, "grad_entropy", logits);
  at::Tensor grad = empty_large(logits.sizes(), logits.options());
  FUSED_CE_CPU_CALL(entropy_backward, logits, temperature, entropy.contiguous(), lse.contiguous(), grad_entropy, grad);
  return grad;
}

void scale_rows_cpu(const at::Tensor& rows, const at::Tensor& scale) {
  check_scale_rows_args(rows, scale);
  at::Tensor r = rows;
  FUSED_CE_CPU_CALL(scale_rows, r, scale);
}

// The three backward ops: the gradient for per-row coefficients into `grad` (a new
// buffer, another one, or the logits themselves); rows with keep_where_one == 1 are
// left as they are (keep_where_one may be undefined).
void backward_checked(at::Tensor grad, const at::Tensor& logits, const at::Tensor& target,
                      const std::optional<at::Tensor>& weight, const at::Tensor& lse, const at::Tensor& p_coef,
                      const at::Tensor& t_coef, const at::Tensor& keep_where_one, int64_t ignore_index,
                      double label_smoothing, double softcap, int64_t vocab_start, int64_t vocab_total,
                      double logit_scale, double temperature) {
  const KernelArgs args = make_args(logits, target, weight, ignore_index, label_smoothing, softcap, vocab_start,
                                    vocab_total, logit_scale, temperature);
  check_row_vector(lse, "lse", logits);
  check_row_vector(p_coef, "p_coef", logits);
  check_row_vector(t_coef, "t_coef", logits);
  if (keep_where_one.defined()) check_row_vector(keep_where_one, "keep_where_one", logits);
  FUSED_CE_CPU_CALL(backward, args, lse.contiguous(), p_coef.contiguous(), t_coef.contiguous(), keep_where_one, grad);
}

at::Tensor backward_cpu(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                        const at::Tensor& lse, const at::Tensor& p_coef, const at::Tensor& t_coef, int64_t ignore_index,
                        double label_smoothing, double softcap, int64_t vocab_start, int64_t vocab_total,
                        double logit_scale, double temperature) {
  at::Tensor grad = empty_large(logits.sizes(), logits.options());
  backward_checked(grad, logits, target, weight, lse, p_coef, t_coef, at::Tensor(), ignore_index, label_smoothing,
                   softcap, vocab_start, vocab_total, logit_scale, temperature);
  return grad;
}

void backward_into_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                       const std::optional<at::Tensor>& weight, const at::Tensor& lse, const at::Tensor& p_coef,
                       const at::Tensor& t_coef, const at::Tensor& keep_where_one, int64_t ignore_index,
                       double label_smoothing, double softcap, int64_t vocab_start, int64_t vocab_total,
                       double logit_scale, double temperature) {
  check_grad_buffer(grad, logits);
  at::assert_no_overlap(grad, logits);  // in place is cross_entropy_backward_
  backward_checked(grad, logits, target, weight, lse, p_coef, t_coef, keep_where_one, ignore_index, label_smoothing,
                   softcap, vocab_start, vocab_total, logit_scale, temperature);
}

void backward_inplace_cpu(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                          const at::Tensor& lse, const at::Tensor& p_coef, const at::Tensor& t_coef,
                          int64_t ignore_index, double label_smoothing, double softcap, int64_t vocab_start,
                          int64_t vocab_total, double logit_scale, double temperature) {
  backward_checked(logits, logits, target, weight, lse, p_coef, t_coef, at::Tensor(), ignore_index, label_smoothing,
                   softcap, vocab_start, vocab_total, logit_scale, temperature);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> distill_forward_cpu(const at::Tensor& student,
                                                                               const at::Tensor& teacher, int64_t kind,
                                                                               double beta, double temperature) {
  check_distill_args(student, teacher, kind, beta, temperature);
  const DistillArgs args{student, teacher, kind, beta, temperature};
  const auto opts = student.options().dtype(accumulate_type(student.scalar_type()));
  at::Tensor loss = at::empty({student.size(0)}, opts), aux = at::empty({student.size(0)}, opts);
  at::Tensor lse_student = at::empty({student.size(0)}, opts), lse_teacher = at::empty({student.size(0)}, opts);
  FUSED_CE_CPU_CALL(distill_forward, args, loss, aux, lse_student, lse_teacher);
  return {loss, aux, lse_student, lse_teacher};
}

at::Tensor distill_backward_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& aux,
                                const at::Tensor& lse_student, const at::Tensor& lse_teacher,
                                const at::Tensor& grad_loss, int64_t kind, double beta, double temperature) {
  check_distill_backward_args(student, teacher, aux, lse_student, lse_teacher, grad_loss, kind, beta, temperature);
  const DistillArgs args{student, teacher, kind, beta, temperature};
  at::Tensor grad = empty_large(student.sizes(), student.options());
  FUSED_CE_CPU_CALL(distill_backward, args, aux.contiguous(), lse_student.contiguous(), lse_teacher.contiguous(),
                    grad_loss, grad);
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_ce, CPU, m) {
  ForwardOps<&forward_into, &empty_large>::register_ops(m);
  m.impl("cross_entropy_backward", &backward_cpu);
  m.impl("cross_entropy_backward_into_", &backward_into_cpu);
  m.impl("cross_entropy_backward_", &backward_inplace_cpu);
  m.impl("scale_rows_", &scale_rows_cpu);
  m.impl("entropy_forward", &entropy_forward_cpu);
  m.impl("entropy_backward", &entropy_backward_cpu);
  m.impl("distill_forward", &distill_forward_cpu);
  m.impl("distill_backward", &distill_backward_cpu);
}

}  // namespace fused_ce::cpu
