// Launches of the CUDA kernels, with the runtime choices (threads per row,
// target mode) turned into template arguments. Included by one launch_<dtype>.cu
// per dtype, so the dtypes compile in parallel.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cstdlib>

#include "cuda/kernels.cuh"

namespace fused_ce::cuda {

// threads_per_row's choice, unless the environment variable
// FUSED_CE_CUDA_THREADS_PER_ROW names a mapping (32, 256, 512 or 1024). Read at
// every launch: a knob for measuring (bench/kernel_times.py), not for training
// (nor for changing from one thread while another launches: getenv is not
// synchronised with setenv).
inline int launch_threads_per_row(int64_t num_classes) {
  const char* text = std::getenv("FUSED_CE_CUDA_THREADS_PER_ROW");
  if (text == nullptr || *text == '\0') return threads_per_row(num_classes);
  char* end = nullptr;
  const long threads = std::strtol(text, &end, 10);
  TORCH_CHECK(*end == '\0' && (threads == 32 || threads == 256 || threads == 512 || threads == 1024),
              "FUSED_CE_CUDA_THREADS_PER_ROW must be 32, 256, 512 or 1024, got '", text, "'");
  return static_cast<int>(threads);
}

template <int kThreads>
int64_t row_blocks(int64_t num_rows) {
  constexpr int kRowsPerBlock = block_size<kThreads>() / kThreads;
  return (num_rows + kRowsPerBlock - 1) / kRowsPerBlock;
}

template <typename scalar_t, int kThreads, TargetMode kMode, bool kWithGrad>
void launch_forward_as(const RowProblem<scalar_t>& p, const ForwardOutputs<acc_type<scalar_t>>& out,
                       const GradInForward<scalar_t>& with_grad, cudaStream_t stream) {
  forward_kernel<scalar_t, kThreads, kMode, kWithGrad>
      <<<row_blocks<kThreads>(p.num_rows), block_size<kThreads>(), 0, stream>>>(p, out, with_grad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int kThreads, TargetMode kMode>
void launch_backward_as(const RowProblem<scalar_t>& p, const BackwardInputs<acc_type<scalar_t>>& in, scalar_t* grad,
                        int64_t grad_stride, cudaStream_t stream) {
  backward_kernel<scalar_t, kThreads, kMode>
      <<<row_blocks<kThreads>(p.num_rows), block_size<kThreads>(), 0, stream>>>(p, in, grad, grad_stride);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_forward(const RowProblem<scalar_t>& p, const ForwardOutputs<acc_type<scalar_t>>& out,
                    const GradInForward<scalar_t>& with_grad, cudaStream_t stream) {
  if (p.num_rows == 0) return;
  dispatch_row_kernel(p, launch_threads_per_row(p.num_classes), [&](auto threads, auto mode) {
    constexpr int kThreads = decltype(threads)::value;
    constexpr TargetMode kMode = decltype(mode)::value;
    if (with_grad.grad != nullptr) {
      launch_forward_as<scalar_t, kThreads, kMode, true>(p, out, with_grad, stream);
    } else {
      launch_forward_as<scalar_t, kThreads, kMode, false>(p, out, with_grad, stream);
    }
  });
}

template <typename scalar_t>
void launch_backward(const RowProblem<scalar_t>& p, const BackwardInputs<acc_type<scalar_t>>& in, scalar_t* grad,
                     int64_t grad_stride, cudaStream_t stream) {
  if (p.num_rows == 0) return;
  dispatch_row_kernel(p, launch_threads_per_row(p.num_classes), [&](auto threads, auto mode) {
    launch_backward_as<scalar_t, decltype(threads)::value, decltype(mode)::value>(p, in, grad, grad_stride, stream);
  });
}

template <typename scalar_t>
void launch_scale_rows(scalar_t* rows, int64_t num_rows, int64_t num_classes, int64_t stride,
                       const acc_type<scalar_t>* scale, int64_t scale_stride, cudaStream_t stream) {
  if (num_rows == 0 || num_classes == 0) return;
  // A grid-stride loop over rows: with scale 1 each block reads a few scalars and exits.
  const int64_t blocks = num_rows < 4096 ? num_rows : 4096;
  scale_rows_kernel<<<blocks, kScaleThreads, 0, stream>>>(rows, num_rows, num_classes, stride, scale, scale_stride);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_entropy_forward(const EntropyArgs<scalar_t>& a, cudaStream_t stream) {
  if (a.num_rows == 0) return;
  dispatch_threads(launch_threads_per_row(a.num_classes), [&](auto threads) {
    constexpr int kThreads = decltype(threads)::value;
    entropy_forward_kernel<scalar_t, kThreads>
        <<<row_blocks<kThreads>(a.num_rows), block_size<kThreads>(), 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t>
void launch_entropy_backward(const EntropyArgs<scalar_t>& a, cudaStream_t stream) {
  if (a.num_rows == 0) return;
  dispatch_threads(launch_threads_per_row(a.num_classes), [&](auto threads) {
    constexpr int kThreads = decltype(threads)::value;
    entropy_backward_kernel<scalar_t, kThreads>
        <<<row_blocks<kThreads>(a.num_rows), block_size<kThreads>(), 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

#define FUSED_CE_INSTANTIATE_CUDA_KERNELS(scalar_t)                                                                   \
  template void launch_forward<scalar_t>(const RowProblem<scalar_t>&, const ForwardOutputs<acc_type<scalar_t>>&,      \
                                         const GradInForward<scalar_t>&, cudaStream_t);                               \
  template void launch_backward<scalar_t>(const RowProblem<scalar_t>&, const BackwardInputs<acc_type<scalar_t>>&,     \
                                          scalar_t*, int64_t, cudaStream_t);                                          \
  template void launch_entropy_forward<scalar_t>(const EntropyArgs<scalar_t>&, cudaStream_t);                         \
  template void launch_entropy_backward<scalar_t>(const EntropyArgs<scalar_t>&, cudaStream_t);                        \
  template void launch_scale_rows<scalar_t>(scalar_t*, int64_t, int64_t, int64_t, const acc_type<scalar_t>*, int64_t, \
                                            cudaStream_t);

}  // namespace fused_ce::cuda
