// The CUDA kernels of csrc/cuda/kernels.cuh, run on the CPU through cuda_shim.h,
// with the threads-per-row mapping chosen by the caller so that every mapping is
// exercised on small shapes. Built by tests/test_cuda_emulated.py.
// clang-format off
#include "cuda_shim.h"  // first: it defines the CUDA keywords kernels.cuh uses
// clang-format on

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
                                double softcap, int64_t vocab_start, int64_t vocab_total, int64_t threads) {
  check_forward_args(logits, target, weight, label_smoothing, softcap);
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor rows = target.is_floating_point() ? target : target.contiguous();
  const auto opts = logits.options().dtype(accumulate_type(logits.scalar_type()));
  at::Tensor loss = at::empty({logits.size(0)}, opts), lse = at::empty_like(loss), mass = at::empty_like(loss);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "emulated_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto p =
        make_problem<scalar_t>(logits, rows, w, ignore_index, label_smoothing, softcap, vocab_start, vocab_total);
    const ForwardOutputs<acc_t> out{loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), mass.data_ptr<acc_t>()};
    dispatch_row_kernel(p, static_cast<int>(threads), [&](auto th, auto mode) {
      using T = decltype(th);
      const int64_t blocks = (p.num_rows + rows_per_block<T>() - 1) / rows_per_block<T>();
      emu::launch(blocks, block_size<T::value>(), forward_kernel<scalar_t, T::value, decltype(mode)::value, false>, p,
                  out, GradInForward<scalar_t>{});
    });
  });
  return {loss, lse, mass};
}

// keep: rows whose keep_where_one is 1 keep grad_in's values (the fused op's backward).
at::Tensor backward(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                    const at::Tensor& lse, const at::Tensor& p_coef, const at::Tensor& t_coef, int64_t ignore_index,
                    double label_smoothing, double softcap, int64_t vocab_start, int64_t vocab_total, int64_t threads,
                    const std::optional<at::Tensor>& keep_where_one, const std::optional<at::Tensor>& grad_in) {
  check_forward_args(logits, target, weight, label_smoothing, softcap);
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor rows = target.is_floating_point() ? target : target.contiguous();
  at::Tensor grad = grad_in.has_value() ? grad_in->clone() : at::empty(logits.sizes(), logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "emulated_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto p =
        make_problem<scalar_t>(logits, rows, w, ignore_index, label_smoothing, softcap, vocab_start, vocab_total);
    BackwardInputs<acc_t> in{lse.const_data_ptr<acc_t>(), p_coef.const_data_ptr<acc_t>(),
                             t_coef.const_data_ptr<acc_t>()};
    if (keep_where_one.has_value()) {
      in.keep_where_one = keep_where_one->const_data_ptr<acc_t>();
      in.keep_stride = keep_where_one->stride(0);
    }
    scalar_t* g = grad.data_ptr<scalar_t>();
    dispatch_row_kernel(p, static_cast<int>(threads), [&](auto th, auto mode) {
      using T = decltype(th);
      const int64_t blocks = (p.num_rows + rows_per_block<T>() - 1) / rows_per_block<T>();
      emu::launch(blocks, block_size<T::value>(), backward_kernel<scalar_t, T::value, decltype(mode)::value>, p, in, g,
                  grad.stride(0));
    });
  });
  return grad;
}

// The gradient-in-forward kernel; inplace writes the gradient over the logits.
std::vector<at::Tensor> fused(const at::Tensor& logits, const at::Tensor& target,
                              const std::optional<at::Tensor>& weight, const at::Tensor& row_scale,
                              const std::optional<at::Tensor>& z_scale, int64_t ignore_index, double label_smoothing,
                              double softcap, int64_t vocab_start, int64_t vocab_total, int64_t threads, bool inplace) {
  check_forward_args(logits, target, weight, label_smoothing, softcap);
  check_fused_args(logits, row_scale, z_scale);
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor rows = target.is_floating_point() ? target : target.contiguous();
  const auto opts = logits.options().dtype(accumulate_type(logits.scalar_type()));
  at::Tensor objective = at::empty({logits.size(0)}, opts), lse = at::empty_like(objective);
  at::Tensor mass = at::empty_like(objective);
  at::Tensor grad = inplace ? logits : at::empty(logits.sizes(), logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "emulated_fused", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto p =
        make_problem<scalar_t>(logits, rows, w, ignore_index, label_smoothing, softcap, vocab_start, vocab_total);
    const ForwardOutputs<acc_t> out{objective.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), mass.data_ptr<acc_t>()};
    GradInForward<scalar_t> with_grad;
    with_grad.row_scale = row_scale.const_data_ptr<acc_t>();
    with_grad.z_scale = z_scale.has_value() ? z_scale->const_data_ptr<acc_t>() : nullptr;
    with_grad.grad = grad.data_ptr<scalar_t>();
    with_grad.grad_stride = grad.stride(0);
    dispatch_row_kernel(p, static_cast<int>(threads), [&](auto th, auto mode) {
      using T = decltype(th);
      const int64_t blocks = (p.num_rows + rows_per_block<T>() - 1) / rows_per_block<T>();
      emu::launch(blocks, block_size<T::value>(), forward_kernel<scalar_t, T::value, decltype(mode)::value, true>, p,
                  out, with_grad);
    });
  });
  return {objective, lse, mass, grad};
}

std::vector<at::Tensor> entropy(const at::Tensor& logits, const at::Tensor& grad_entropy, int64_t threads) {
  check_entropy_args(logits);
  const auto opts = logits.options().dtype(accumulate_type(logits.scalar_type()));
  at::Tensor entropy = at::empty({logits.size(0)}, opts), lse = at::empty_like(entropy);
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "emulated_entropy", [&] {
    using acc_t = acc_type<scalar_t>;
    EntropyArgs<scalar_t> a{logits.const_data_ptr<scalar_t>(), logits.stride(0),     logits.size(0), logits.size(1),
                            entropy.data_ptr<acc_t>(),         lse.data_ptr<acc_t>()};
    a.grad_entropy = grad_entropy.const_data_ptr<acc_t>();
    a.grad_entropy_stride = grad_entropy.stride(0);
    a.grad = grad.data_ptr<scalar_t>();
    dispatch_threads(threads, [&](auto th) {
      using T = decltype(th);
      const int64_t blocks = (a.num_rows + rows_per_block<T>() - 1) / rows_per_block<T>();
      emu::launch(blocks, block_size<T::value>(), entropy_forward_kernel<scalar_t, T::value>, a);
      emu::launch(blocks, block_size<T::value>(), entropy_backward_kernel<scalar_t, T::value>, a);
    });
  });
  return {entropy, lse, grad};
}

void scale_rows(at::Tensor rows, const at::Tensor& scale) {
  check_scale_rows_args(rows, scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "emulated_scale_rows", [&] {
    using acc_t = acc_type<scalar_t>;
    emu::launch(std::min<int64_t>(rows.size(0), 3), kScaleThreads, scale_rows_kernel<scalar_t>, rows.data_ptr<scalar_t>(),
                rows.size(0), rows.size(1), rows.stride(0), scale.const_data_ptr<acc_t>(), scale.stride(0));
  });
}

}  // namespace fused_ce::cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &fused_ce::cuda::forward);
  m.def("backward", &fused_ce::cuda::backward);
  m.def("fused", &fused_ce::cuda::fused);
  m.def("scale_rows", &fused_ce::cuda::scale_rows);
  m.def("entropy", &fused_ce::cuda::entropy);
}
