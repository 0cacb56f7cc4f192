// Host-side interface of the CUDA distillation kernels (distill.cuh): what a launch
// needs, in raw pointers. Instantiated in distill.cu; cuda/dispatch.cpp registers the ops.
#pragma once

#include <cstdint>

#include "cuda/launch.h"  // acc_type, cudaStream_t

namespace fused_ce::cuda {

template <typename scalar_t>
struct DistillRows {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* student;
  const scalar_t* teacher;
  int64_t student_stride, teacher_stride, num_rows, num_classes;
  acc_t inv_t, beta;
  acc_t* loss;  // forward: [num_rows] outputs (aux, lse_student, lse_teacher alike)
  acc_t* aux;
  acc_t* lse_student;
  acc_t* lse_teacher;
  const acc_t* grad_loss = nullptr;  // backward: [num_rows], stride grad_loss_stride
  int64_t grad_loss_stride = 0;
  scalar_t* grad = nullptr;  // backward: [num_rows, num_classes], contiguous
};

// kind: DistillKind (common/distill_math.h). Forward writes loss, aux and both lse;
// backward reads them with grad_loss and writes grad.
template <typename scalar_t>
void launch_distill_forward(const DistillRows<scalar_t>& rows, int64_t kind, cudaStream_t stream);

template <typename scalar_t>
void launch_distill_backward(const DistillRows<scalar_t>& rows, int64_t kind, cudaStream_t stream);

}  // namespace fused_ce::cuda
