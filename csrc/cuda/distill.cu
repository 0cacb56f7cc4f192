// Launches of the CUDA distillation kernels, for every dtype.
#include <c10/cuda/CUDAException.h>

#include "cuda/distill.cuh"

namespace fused_ce::cuda {

template <typename scalar_t>
void launch_distill_forward(const DistillRows<scalar_t>& rows, int64_t kind, cudaStream_t stream) {
  if (rows.num_rows == 0) return;
  dispatch_distill_kind(kind, [&](auto k) {
    distill_forward_kernel<scalar_t, decltype(k)::value><<<rows.num_rows, kDistillThreads, 0, stream>>>(rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t>
void launch_distill_backward(const DistillRows<scalar_t>& rows, int64_t kind, cudaStream_t stream) {
  if (rows.num_rows == 0) return;
  dispatch_distill_kind(kind, [&](auto k) {
    distill_backward_kernel<scalar_t, decltype(k)::value><<<rows.num_rows, kDistillThreads, 0, stream>>>(rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

#define FUSED_CE_INSTANTIATE_DISTILL(scalar_t)                                                         \
  template void launch_distill_forward<scalar_t>(const DistillRows<scalar_t>&, int64_t, cudaStream_t); \
  template void launch_distill_backward<scalar_t>(const DistillRows<scalar_t>&, int64_t, cudaStream_t);

FUSED_CE_INSTANTIATE_DISTILL(float)
FUSED_CE_INSTANTIATE_DISTILL(double)
FUSED_CE_INSTANTIATE_DISTILL(c10::Half)
FUSED_CE_INSTANTIATE_DISTILL(c10::BFloat16)

}  // namespace fused_ce::cuda
