// Entry points of the CPU kernels. kernels.cpp is compiled once per x86
// instruction set (see setup.py) into namespaces named after ATen's
// CPU_CAPABILITY values; dispatch.cpp picks one at run time.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/ce_math.h"

namespace fused_ce::cpu {

// Arguments of one call, already checked by dispatch.cpp.
struct KernelArgs {
  at::Tensor logits;  // [N, V], unit class stride
  at::Tensor target;  // [N] int64, or [N, V] probabilities (logits' dtype, unit class stride)
  at::Tensor weight;  // [V] float32, or undefined
  int64_t ignore_index;
  TargetSpec spec;
  double softcap;  // <= 0: off
};

#define FUSED_CE_DECLARE_CPU_KERNELS(isa)                                                          \
  namespace isa {                                                                                  \
  /* loss, lse, mass: [N] float32 outputs */                                                       \
  void forward(const KernelArgs& args, at::Tensor& loss, at::Tensor& lse, at::Tensor& mass);       \
  /* grad_logits [N, V] contiguous; lse, p_coef, t_coef [N] float32 */                             \
  void backward(const KernelArgs& args, const at::Tensor& lse, const at::Tensor& p_coef,           \
                const at::Tensor& t_coef, at::Tensor& grad_logits);                                \
  }

FUSED_CE_DECLARE_CPU_KERNELS(DEFAULT)
#if defined(__x86_64__) || defined(_M_X64)
FUSED_CE_DECLARE_CPU_KERNELS(AVX2)
FUSED_CE_DECLARE_CPU_KERNELS(AVX512)
#endif

}  // namespace fused_ce::cpu
