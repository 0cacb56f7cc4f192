// The CUDA distillation kernels of csrc/cuda/distill.cuh, run on the CPU through
// cuda_shim.h (every CUDA thread a std::thread). Built by tests/test_cuda_emulated_distill.py.
// clang-format off
#include "cuda_shim.h"  // first: it defines the CUDA keywords distill.cuh uses
// clang-format on

#include <ATen/Dispatch.h>
#include <torch/extension.h>

#include "common/checks.h"
#include "cuda/distill.cuh"
#include "cuda/distill_problem.h"

namespace fused_ce::cuda {

// (loss, aux, lse_student, lse_teacher, grad) for an upstream grad_loss, as the CUDA ops compute them.
std::vector<at::Tensor> distill(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& grad_loss,
                                int64_t kind, double beta, double temperature) {
  check_distill_args(student, teacher, kind, beta, temperature);
  const auto opts = student.options().dtype(accumulate_type(student.scalar_type()));
  const int64_t N = student.size(0);
  at::Tensor loss = at::empty({N}, opts), aux = at::empty({N}, opts), lse_s = at::empty({N}, opts),
             lse_t = at::empty({N}, opts), grad = at::empty(student.sizes(), student.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "emulated_distill", [&] {
    auto r = make_distill_rows<scalar_t>(student, teacher, beta, temperature);
    set_distill_row_outputs(r, loss, aux, lse_s, lse_t);
    set_distill_backward(r, grad_loss, grad);
    dispatch_distill_kind(kind, [&](auto k) {
      // A block a row, no dynamic shared memory, no clusters.
      emu::launch(N, kDistillThreads, 0, 1, distill_forward_kernel<scalar_t, decltype(k)::value>, r);
      emu::launch(N, kDistillThreads, 0, 1, distill_backward_kernel<scalar_t, decltype(k)::value>, r);
    });
  });
  return {loss, aux, lse_s, lse_t, grad};
}

}  // namespace fused_ce::cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("distill", &fused_ce::cuda::distill); }
