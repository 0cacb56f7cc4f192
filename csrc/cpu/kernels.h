// Entry points of the CPU kernels. kernels.cpp is compiled once per x86
// instruction set (see setup.py) into namespaces named after ATen's
// CPU_CAPABILITY values; dispatch.cpp picks one at run time.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/ce_math.h"
#include "common/checks.h"

namespace fused_ce::cpu {

// Arguments of one call, already checked by dispatch.cpp.
struct KernelArgs {
  at::Tensor logits;  // [N, V], unit class stride
  at::Tensor target;  // [N] int64, or [N, V] probabilities (logits' dtype, unit class stride)
  at::Tensor weight;  // [V] in the accumulation dtype (accumulate_type), or undefined
  int64_t ignore_index;
  TargetSpec spec;
  double softcap;            // <= 0: off
  VocabSlice vocab;          // the classes the logits hold; class-index targets are global
  double logit_scale = 1.0;  // z = softcap(logit_scale * x) / temperature (common/ce_math.h, LogitMap)
  double temperature = 1.0;
};

// The gradient written by the forward pass itself (see objective() in
// common/ce_math.h); the per-row output is then the objective.
struct GradInForward {
  at::Tensor row_scale;  // [N] in the accumulation dtype
  at::Tensor z_scale;    // [N] in the accumulation dtype, or undefined (no z-loss)
  at::Tensor grad;       // [N, V], unit class stride; may be the logits themselves
};

// A distillation problem (common/distill_math.h): student and teacher rows [N, V]
// (unit class stride, the same dtype), already checked.
struct DistillArgs {
  at::Tensor student;
  at::Tensor teacher;
  int64_t kind;  // DistillKind
  double beta;
  double temperature;
};

// The row's prediction, tracked in the statistics pass (the ops' .stats overloads):
// the argmax of the logits the loss sees, the lowest index among ties (a NaN counts as
// the largest, as torch.argmax), and that logit.
struct ArgmaxOutputs {
  at::Tensor index;  // [N] int64, within these logits (a slice: local)
  at::Tensor value;  // [N] in the accumulation dtype
};

#define FUSED_CE_DECLARE_CPU_KERNELS(isa)                                                                          \
  namespace isa {                                                                                                  \
  /* loss (or objective), lse, mass (may be undefined): [N] outputs in the accumulation dtype */                   \
  void forward(const KernelArgs& args, at::Tensor& loss, at::Tensor& lse, at::Tensor& mass,                        \
               const GradInForward* with_grad, const ArgmaxOutputs* argmax);                                       \
  /* grad_logits [N, V] (unit class stride); lse, p_coef, t_coef [N] in the accumulation dtype; */                 \
  /* rows i with keep_where_one[i] == 1 are left as they are (keep_where_one may be undefined) */                  \
  void backward(const KernelArgs& args, const at::Tensor& lse, const at::Tensor& p_coef, const at::Tensor& t_coef, \
                const at::Tensor& keep_where_one, at::Tensor& grad_logits);                                        \
  /* rows [N, V] *= scale [N] (any strides); rows whose scale is 1 are skipped */                                  \
  void scale_rows(at::Tensor& rows, const at::Tensor& scale);                                                      \
  /* entropy, lse [N] of softmax(logits [N, V]); its backward into grad [N, V] contiguous */                       \
  void entropy_forward(const at::Tensor& logits, double temperature, at::Tensor& entropy, at::Tensor& lse);        \
  void entropy_backward(const at::Tensor& logits, double temperature, const at::Tensor& entropy,                   \
                        const at::Tensor& lse, const at::Tensor& grad_entropy, at::Tensor& grad);                  \
  /* the divergence per row, its statistic R (distill_math.h) and both rows' lse [N]; the student's gradient */    \
  void distill_forward(const DistillArgs& args, at::Tensor& loss, at::Tensor& aux, at::Tensor& lse_student,        \
                       at::Tensor& lse_teacher);                                                                   \
  void distill_backward(const DistillArgs& args, const at::Tensor& aux, const at::Tensor& lse_student,             \
                        const at::Tensor& lse_teacher, const at::Tensor& grad_loss, at::Tensor& grad_student);     \
  }

FUSED_CE_DECLARE_CPU_KERNELS(DEFAULT)
#if defined(__x86_64__) || defined(_M_X64)
FUSED_CE_DECLARE_CPU_KERNELS(AVX2)
FUSED_CE_DECLARE_CPU_KERNELS(AVX512)
#endif

}  // namespace fused_ce::cpu
