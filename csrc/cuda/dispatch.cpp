// CUDA registration of the fused_ce ops: argument checks, output allocation on
// the logits' device, launches on the current stream.
//
// A class index out of range never makes a kernel read out of bounds: that row's
// results are NaN (checking on the host would cost a synchronisation; the Python
// API can opt into it, see fused_ce.set_target_validation).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cuda/problem.h"

namespace fused_ce::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                            const std::optional<at::Tensor>& weight,
                                                            int64_t ignore_index, double label_smoothing,
                                                            double softcap) {
  check_forward_args(logits, target, weight, label_smoothing, softcap);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor target_rows = target.is_floating_point() ? target : target.contiguous();
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({logits.size(0)}, opts);
  at::Tensor lse = at::empty({logits.size(0)}, opts);
  at::Tensor mass = at::empty({logits.size(0)}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "fused_ce_forward_cuda", [&] {
    launch_forward(make_problem<scalar_t>(logits, target_rows, w, ignore_index, label_smoothing, softcap),
                   ForwardOutputs{loss.data_ptr<float>(), lse.data_ptr<float>(), mass.data_ptr<float>()}, stream);
  });
  return {loss, lse, mass};
}

at::Tensor backward_cuda(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                         const at::Tensor& lse, const at::Tensor& p_coef, const at::Tensor& t_coef,
                         int64_t ignore_index, double label_smoothing, double softcap) {
  check_forward_args(logits, target, weight, label_smoothing, softcap);
  check_row_vector(lse, "lse", logits);
  check_row_vector(p_coef, "p_coef", logits);
  check_row_vector(t_coef, "t_coef", logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor target_rows = target.is_floating_point() ? target : target.contiguous();
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor lse_c = lse.contiguous(), p_coef_c = p_coef.contiguous(), t_coef_c = t_coef.contiguous();
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "fused_ce_backward_cuda", [&] {
    launch_backward(make_problem<scalar_t>(logits, target_rows, w, ignore_index, label_smoothing, softcap),
                    BackwardInputs{lse_c.const_data_ptr<float>(), p_coef_c.const_data_ptr<float>(),
                                   t_coef_c.const_data_ptr<float>()},
                    grad.data_ptr<scalar_t>(), stream);
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_ce, CUDA, m) {
  m.impl("cross_entropy_forward", &forward_cuda);
  m.impl("cross_entropy_backward", &backward_cuda);
}

}  // namespace fused_ce::cuda
