// Launches of the CUDA kernels, with the runtime choices (threads per row,
// target mode) turned into template arguments. Included by one launch_<dtype>.cu
// per dtype, so the dtypes compile in parallel.
#pragma once

#include <c10/cuda/CUDAException.h>

#include "cuda/kernels.cuh"

namespace fused_ce::cuda {

template <typename scalar_t, int kThreads, TargetMode kMode>
void launch_forward_as(const RowProblem<scalar_t>& p, const ForwardOutputs& out, cudaStream_t stream) {
  constexpr int kRowsPerBlock = block_size<kThreads>() / kThreads;
  const int64_t blocks = (p.num_rows + kRowsPerBlock - 1) / kRowsPerBlock;
  forward_kernel<scalar_t, kThreads, kMode><<<blocks, block_size<kThreads>(), 0, stream>>>(p, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int kThreads, TargetMode kMode>
void launch_backward_as(const RowProblem<scalar_t>& p, const BackwardInputs& in, scalar_t* grad,
                        cudaStream_t stream) {
  constexpr int kRowsPerBlock = block_size<kThreads>() / kThreads;
  const int64_t blocks = (p.num_rows + kRowsPerBlock - 1) / kRowsPerBlock;
  backward_kernel<scalar_t, kThreads, kMode><<<blocks, block_size<kThreads>(), 0, stream>>>(p, in, grad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_forward(const RowProblem<scalar_t>& p, const ForwardOutputs& out, cudaStream_t stream) {
  if (p.num_rows == 0) return;
  dispatch_row_kernel(p, threads_per_row(p.num_classes), [&](auto threads, auto mode) {
    launch_forward_as<scalar_t, decltype(threads)::value, decltype(mode)::value>(p, out, stream);
  });
}

template <typename scalar_t>
void launch_backward(const RowProblem<scalar_t>& p, const BackwardInputs& in, scalar_t* grad, cudaStream_t stream) {
  if (p.num_rows == 0) return;
  dispatch_row_kernel(p, threads_per_row(p.num_classes), [&](auto threads, auto mode) {
    launch_backward_as<scalar_t, decltype(threads)::value, decltype(mode)::value>(p, in, grad, stream);
  });
}

#define FUSED_CE_INSTANTIATE_CUDA_KERNELS(scalar_t)                                                       \
  template void launch_forward<scalar_t>(const RowProblem<scalar_t>&, const ForwardOutputs&, cudaStream_t); \
  template void launch_backward<scalar_t>(const RowProblem<scalar_t>&, const BackwardInputs&, scalar_t*,    \
                                          cudaStream_t);

}  // namespace fused_ce::cuda
