// Builds a distillation launch's DistillRows from the ops' (already checked)
// arguments. Shared by dispatch.cpp and the CPU emulation of the kernels in tests/.
#pragma once

#include <ATen/core/Tensor.h>

#include "cuda/distill.h"

namespace fused_ce::cuda {

// The rows and options; the per-row outputs and the gradient are the caller's to set.
template <typename scalar_t>
DistillRows<scalar_t> make_distill_rows(const at::Tensor& student, const at::Tensor& teacher, double beta,
                                        double temperature) {
  using acc_t = acc_type<scalar_t>;
  DistillRows<scalar_t> r{};
  r.student = student.const_data_ptr<scalar_t>();
  r.teacher = teacher.const_data_ptr<scalar_t>();
  r.student_stride = student.stride(0);
  r.teacher_stride = teacher.stride(0);
  r.num_rows = student.size(0);
  r.num_classes = student.size(1);
  r.inv_t = static_cast<acc_t>(1.0 / temperature);
  r.beta = static_cast<acc_t>(beta);
  return r;
}

// Forward's per-row outputs, [N] in the accumulation dtype, for the forward kernel to write.
template <typename scalar_t>
void set_distill_row_outputs(DistillRows<scalar_t>& r, const at::Tensor& loss, const at::Tensor& aux,
                             const at::Tensor& lse_student, const at::Tensor& lse_teacher) {
  using acc_t = acc_type<scalar_t>;
  r.loss = loss.data_ptr<acc_t>();
  r.aux = aux.data_ptr<acc_t>();
  r.lse_student = lse_student.data_ptr<acc_t>();
  r.lse_teacher = lse_teacher.data_ptr<acc_t>();
}

// The backward's upstream gradient grad_loss [N] and the student's gradient grad [N, V] it writes.
template <typename scalar_t>
void set_distill_backward(DistillRows<scalar_t>& r, const at::Tensor& grad_loss, const at::Tensor& grad) {
  r.grad_loss = grad_loss.const_data_ptr<acc_type<scalar_t>>();
  r.grad_loss_stride = grad_loss.stride(0);
  r.grad = grad.data_ptr<scalar_t>();
}

}  // namespace fused_ce::cuda
