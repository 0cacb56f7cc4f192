// CUDA registration of the fused_ce ops: argument checks, output allocation on
// the logits' device, launches on the current stream.
//
// A class index out of range never makes a kernel read out of bounds: that row's
// results are NaN (checking on the host would cost a synchronisation; the Python
// API can opt into it, see fused_ce.set_target_validation).
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/forward_ops.h"
#include "cuda/distill_problem.h"
#include "cuda/problem.h"

namespace fused_ce::cuda {
namespace {

// The statistics pass: per-row (loss or objective, lse, mass) and, with_argmax, the row's
// argmax and its logit (the .stats overloads); with grad (row_scale given), the gradient of
// the objective written to *grad in the same kernel.
ForwardStats forward_into(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                          const at::Tensor* row_scale, const std::optional<at::Tensor>& z_scale, int64_t ignore_index,
                          double label_smoothing, double softcap, int64_t vocab_start, int64_t vocab_total,
                          double logit_scale, double temperature, const at::Tensor* grad, bool with_argmax) {
  check_logit_map(logit_scale, temperature);
  check_forward_args(logits, target, weight, label_smoothing, softcap);
  if (grad) check_fused_args(logits, *row_scale, z_scale);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor target_rows = target.is_floating_point() ? target : target.contiguous();
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const int64_t N = logits.size(0);
  const auto opts = logits.options().dtype(accumulate_type(logits.scalar_type()));
  at::Tensor loss = at::empty({N}, opts), lse = at::empty({N}, opts), mass = at::empty({N}, opts);
  at::Tensor argmax = at::empty({with_argmax ? N : 0}, logits.options().dtype(at::kLong));
  at::Tensor max_logit = at::empty({with_argmax ? N : 0}, opts);
  const at::Tensor row_scale_c = grad ? row_scale->contiguous() : at::Tensor();
  const at::Tensor z_scale_c = grad && z_scale.has_value() ? z_scale->contiguous() : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "fused_ce_forward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    ForwardOutputs<acc_t> out{loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), mass.data_ptr<acc_t>()};
    if (with_argmax) {
      out.argmax = argmax.data_ptr<int64_t>();
      out.max_logit = max_logit.data_ptr<acc_t>();
    }
    GradInForward<scalar_t> with_grad;
    if (grad) {
      with_grad.row_scale = row_scale_c.const_data_ptr<acc_t>();
      with_grad.z_scale = z_scale_c.defined() ? z_scale_c.const_data_ptr<acc_t>() : nullptr;
      with_grad.grad = grad->data_ptr<scalar_t>();
      with_grad.grad_stride = grad->stride(0);
    }
    launch_forward(make_problem<scalar_t>(logits, target_rows, w, ignore_index, label_smoothing, softcap, vocab_start,
                                          vocab_total, logit_scale, temperature),
                   out, with_grad, stream);
  });
  return {loss, lse, mass, argmax, max_logit};
}

at::Tensor empty_grad(at::IntArrayRef sizes, const at::TensorOptions& options) { return at::empty(sizes, options); }

void backward_into(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                   const std::optional<at::Tensor>& weight, const at::Tensor& lse, const at::Tensor& p_coef,
                   const at::Tensor& t_coef, const at::Tensor* keep_where_one, int64_t ignore_index,
                   double label_smoothing, double softcap, int64_t vocab_start, int64_t vocab_total, double logit_scale,
                   double temperature) {
  check_forward_args(logits, target, weight, label_smoothing, softcap);
  check_row_vector(lse, "lse", logits);
  check_row_vector(p_coef, "p_coef", logits);
  check_row_vector(t_coef, "t_coef", logits);
  if (keep_where_one) check_row_vector(*keep_where_one, "keep_where_one", logits);
  check_grad_buffer(grad, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor target_rows = target.is_floating_point() ? target : target.contiguous();
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor lse_c = lse.contiguous(), p_coef_c = p_coef.contiguous(), t_coef_c = t_coef.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "fused_ce_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    BackwardInputs<acc_t> in{lse_c.const_data_ptr<acc_t>(), p_coef_c.const_data_ptr<acc_t>(),
                             t_coef_c.const_data_ptr<acc_t>()};
    if (keep_where_one) {
      in.keep_where_one = keep_where_one->const_data_ptr<acc_t>();
      in.keep_stride = keep_where_one->stride(0);
    }
    launch_backward(make_problem<scalar_t>(logits, target_rows, w, ignore_index, label_smoothing, softcap, vocab_start,
                                           vocab_total, logit_scale, temperature),
                    in, grad.data_ptr<scalar_t>(), grad.stride(0), stream);
  });
}

at::Tensor backward_cuda(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                         const at::Tensor& lse, const at::Tensor& p_coef, const at::Tensor& t_coef,
                         int64_t ignore_index, double label_smoothing, double softcap, int64_t vocab_start,
                         int64_t vocab_total, double logit_scale, double temperature) {
  check_logit_map(logit_scale, temperature);
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  backward_into(grad, logits, target, weight, lse, p_coef, t_coef, nullptr, ignore_index, label_smoothing, softcap,
                vocab_start, vocab_total, logit_scale, temperature);
  return grad;
}

void backward_into_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                        const std::optional<at::Tensor>& weight, const at::Tensor& lse, const at::Tensor& p_coef,
                        const at::Tensor& t_coef, const at::Tensor& keep_where_one, int64_t ignore_index,
                        double label_smoothing, double softcap, int64_t vocab_start, int64_t vocab_total,
                        double logit_scale, double temperature) {
  check_logit_map(logit_scale, temperature);
  at::assert_no_overlap(grad, logits);  // in place is cross_entropy_backward_
  backward_into(grad, logits, target, weight, lse, p_coef, t_coef, &keep_where_one, ignore_index, label_smoothing,
                softcap, vocab_start, vocab_total, logit_scale, temperature);
}

void backward_inplace_cuda(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                           const at::Tensor& lse, const at::Tensor& p_coef, const at::Tensor& t_coef,
                           int64_t ignore_index, double label_smoothing, double softcap, int64_t vocab_start,
                           int64_t vocab_total, double logit_scale, double temperature) {
  check_logit_map(logit_scale, temperature);
  backward_into(logits, logits, target, weight, lse, p_coef, t_coef, nullptr, ignore_index, label_smoothing, softcap,
                vocab_start, vocab_total, logit_scale, temperature);
}

template <typename scalar_t>
EntropyArgs<scalar_t> entropy_args(const at::Tensor& logits, at::Tensor& entropy, at::Tensor& lse, double temperature) {
  using acc_t = acc_type<scalar_t>;
  EntropyArgs<scalar_t> a{logits.const_data_ptr<scalar_t>(), logits.stride(0),     logits.size(0), logits.size(1),
                          entropy.data_ptr<acc_t>(),         lse.data_ptr<acc_t>()};
  a.post = make_logit_map<acc_t>(1.0, 0.0, temperature).post;  // as the CPU kernels round 1 / temperature
  return a;
}

std::tuple<at::Tensor, at::Tensor> entropy_forward_cuda(const at::Tensor& logits, double temperature) {
  check_entropy_args(logits);
  check_logit_map(1.0, temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto opts = logits.options().dtype(accumulate_type(logits.scalar_type()));
  at::Tensor entropy = at::empty({logits.size(0)}, opts);
  at::Tensor lse = at::empty({logits.size(0)}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "fused_ce_entropy_forward_cuda", [&] {
    launch_entropy_forward(entropy_args<scalar_t>(logits, entropy, lse, temperature), stream);
  });
  return {entropy, lse};
}

at::Tensor entropy_backward_cuda(const at::Tensor& logits, const at::Tensor& entropy, const at::Tensor& lse,
                                 const at::Tensor& grad_entropy, double temperature) {
  check_entropy_args(logits);
  check_logit_map(1.0, temperature);
  check_row_vector(entropy, "entropy", logits);
  check_row_vector(lse, "lse", logits);
  check_row_vector(grad_entropy, "grad_entropy", logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor entropy_c = entropy.contiguous(), lse_c = lse.contiguous();
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "fused_ce_entropy_backward_cuda",
                                  [&] {
                                    using acc_t = acc_type<scalar_t>;
                                    auto a = entropy_args<scalar_t>(logits, entropy_c, lse_c, temperature);
                                    a.grad_entropy = grad_entropy.const_data_ptr<acc_t>();
                                    a.grad_entropy_stride = grad_entropy.stride(0);
                                    a.grad = grad.data_ptr<scalar_t>();
                                    launch_entropy_backward(a, stream);
                                  });
  return grad;
}

void scale_rows_cuda(const at::Tensor& rows, const at::Tensor& scale) {
  check_scale_rows_args(rows, scale);
  const c10::cuda::CUDAGuard guard(rows.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "fused_ce_scale_rows_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    launch_scale_rows(rows.data_ptr<scalar_t>(), rows.size(0), rows.size(1), rows.stride(0),
                      scale.const_data_ptr<acc_t>(), scale.stride(0), stream);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> distill_forward_cuda(const at::Tensor& student,
                                                                                const at::Tensor& teacher, int64_t kind,
                                                                                double beta, double temperature) {
  check_distill_args(student, teacher, kind, beta, temperature);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto opts = student.options().dtype(accumulate_type(student.scalar_type()));
  const int64_t N = student.size(0);
  at::Tensor loss = at::empty({N}, opts), aux = at::empty({N}, opts);
  at::Tensor lse_student = at::empty({N}, opts), lse_teacher = at::empty({N}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "fused_ce_distill_forward_cuda",
                                  [&] {
                                    auto r = make_distill_rows<scalar_t>(student, teacher, beta, temperature);
                                    set_distill_row_outputs(r, loss, aux, lse_student, lse_teacher);
                                    launch_distill_forward(r, kind, stream);
                                  });
  return {loss, aux, lse_student, lse_teacher};
}

at::Tensor distill_backward_cuda(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& aux,
                                 const at::Tensor& lse_student, const at::Tensor& lse_teacher,
                                 const at::Tensor& grad_loss, int64_t kind, double beta, double temperature) {
  check_distill_backward_args(student, teacher, aux, lse_student, lse_teacher, grad_loss, kind, beta, temperature);
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor aux_c = aux.contiguous(), lse_s = lse_student.contiguous(), lse_t = lse_teacher.contiguous();
  at::Tensor grad = at::empty(student.sizes(), student.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "fused_ce_distill_backward_cuda",
                                  [&] {
                                    using acc_t = acc_type<scalar_t>;
                                    auto r = make_distill_rows<scalar_t>(student, teacher, beta, temperature);
                                    // Forward's outputs, read by backward (the kernel does not write them).
                                    r.aux = const_cast<acc_t*>(aux_c.const_data_ptr<acc_t>());
                                    r.lse_student = const_cast<acc_t*>(lse_s.const_data_ptr<acc_t>());
                                    r.lse_teacher = const_cast<acc_t*>(lse_t.const_data_ptr<acc_t>());
                                    set_distill_backward(r, grad_loss, grad);
                                    launch_distill_backward(r, kind, stream);
                                  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_ce, CUDA, m) {
  ForwardOps<&forward_into, &empty_grad>::register_ops(m);
  m.impl("cross_entropy_backward", &backward_cuda);
  m.impl("cross_entropy_backward_into_", &backward_into_cuda);
  m.impl("cross_entropy_backward_", &backward_inplace_cuda);
  m.impl("scale_rows_", &scale_rows_cuda);
  m.impl("entropy_forward", &entropy_forward_cuda);
  m.impl("entropy_backward", &entropy_backward_cuda);
  m.impl("distill_forward", &distill_forward_cuda);
  m.impl("distill_backward", &distill_backward_cuda);
}

}  // namespace fused_ce::cuda
