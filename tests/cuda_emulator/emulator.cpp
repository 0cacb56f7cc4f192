// The CUDA kernels of csrc/cuda/kernels.cuh, run on the CPU through cuda_shim.h,
// with the threads-per-row mapping chosen by the caller so that every mapping is
// exercised on small shapes. Built by tests/test_cuda_emulated.py.
#include "cuda_shim.h"  // first: it defines the CUDA keywords kernels.cuh uses

#include <ATen/Dispatch.h>
#include <torch/extension.h>

#include "cuda/kernels.cuh"
#include "cuda/problem.h"

namespace fused_ce::cuda {

template <typename T>
constexpr int64_t rows_per_block() {
  return block_size<T::value>() / T::value;
}

std::vector<at::Tensor> forward(const at::Tensor& logits, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, int64_t ignore_index, double label_smoothing,
                                double softcap, int64_t threads) {
  check_forward_args(logits, target, weight, label_smoothing, softcap);
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor rows = target.is_floating_point() ? target : target.contiguous();
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({logits.size(0)}, opts), lse = at::empty_like(loss), mass = at::empty_like(loss);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "emulated_forward", [&] {
    const auto p = make_problem<scalar_t>(logits, rows, w, ignore_index, label_smoothing, softcap);
    const ForwardOutputs out{loss.data_ptr<float>(), lse.data_ptr<float>(), mass.data_ptr<float>()};
    dispatch_row_kernel(p, static_cast<int>(threads), [&](auto th, auto mode) {
      using T = decltype(th);
      const int64_t blocks = (p.num_rows + rows_per_block<T>() - 1) / rows_per_block<T>();
      emu::launch(blocks, block_size<T::value>(), forward_kernel<scalar_t, T::value, decltype(mode)::value>, p, out);
    });
  });
  return {loss, lse, mass};
}

at::Tensor backward(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                    const at::Tensor& lse, const at::Tensor& p_coef, const at::Tensor& t_coef, int64_t ignore_index,
                    double label_smoothing, double softcap, int64_t threads) {
  check_forward_args(logits, target, weight, label_smoothing, softcap);
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor rows = target.is_floating_point() ? target : target.contiguous();
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "emulated_backward", [&] {
    const auto p = make_problem<scalar_t>(logits, rows, w, ignore_index, label_smoothing, softcap);
    const BackwardInputs in{lse.const_data_ptr<float>(), p_coef.const_data_ptr<float>(),
                            t_coef.const_data_ptr<float>()};
    scalar_t* g = grad.data_ptr<scalar_t>();
    dispatch_row_kernel(p, static_cast<int>(threads), [&](auto th, auto mode) {
      using T = decltype(th);
      const int64_t blocks = (p.num_rows + rows_per_block<T>() - 1) / rows_per_block<T>();
      emu::launch(blocks, block_size<T::value>(), backward_kernel<scalar_t, T::value, decltype(mode)::value>, p, in,
                  g);
    });
  });
  return grad;
}

}  // namespace fused_ce::cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &fused_ce::cuda::forward);
  m.def("backward", &fused_ce::cuda::backward);
}
