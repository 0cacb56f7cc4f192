// Launches of the CUDA kernels: the variant from the dispatch table (variants.h) or
// its override, then run.cuh's kernel for it on the current stream. Included by one
// launch_<dtype>.cu per dtype, so the dtypes compile in parallel.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>

#include <atomic>

#include "cuda/run.cuh"
#include "cuda/variants.h"

namespace fused_ce::cuda {

// kernel<<<...>>> on a stream, with a launch check after every launch; clusters through
// cudaLaunchKernelEx.
struct CudaLauncher {
  cudaStream_t stream;

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), const LaunchShape& shape, const Args&... args) const {
    if (shape.smem > 48 * 1024) {  // above the default a kernel must opt in
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shape.smem)));
    }
    if (shape.cluster <= 1) {
      kernel<<<dim3(static_cast<unsigned>(shape.grid)), dim3(shape.block), shape.smem, stream>>>(args...);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(static_cast<unsigned>(shape.grid));
    config.blockDim = dim3(shape.block);
    config.dynamicSmemBytes = shape.smem;
    config.stream = stream;
    cudaLaunchAttribute cluster;
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = unsigned(shape.cluster);
    cluster.val.clusterDim.y = 1;
    cluster.val.clusterDim.z = 1;
    config.attrs = &cluster;
    config.numAttrs = 1;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args...));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// The current device's limits, asked once per device.
inline const DeviceLimits& current_device_limits() {
  constexpr int kCachedDevices = 64;
  static std::atomic<DeviceLimits*> cached[kCachedDevices];
  const int device = c10::cuda::current_device();
  TORCH_CHECK(device < kCachedDevices, "fused_ce: CUDA device ", device, " out of range");
  DeviceLimits* limits = cached[device].load(std::memory_order_acquire);
  if (limits == nullptr) {
    int major = 0, minor = 0, per_sm = 0, per_block = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    // Each resident CTA also takes 1 KB of the SM's shared memory for the system.
    const size_t share = size_t(per_sm) / kSingleReadCtasPerSm - 1024;
    auto* fresh = new DeviceLimits{major * 10 + minor, share < size_t(per_block) ? share : size_t(per_block),
                                   kMaxCluster};
    DeviceLimits* expected = nullptr;
    if (cached[device].compare_exchange_strong(expected, fresh, std::memory_order_acq_rel)) {
      limits = fresh;
    } else {  // another thread was first
      delete fresh;
      limits = expected;
    }
  }
  return *limits;
}

// The kernels split rows at 16-byte boundaries into whole elements: PyTorch's tensors are
// element-aligned (offsets count elements); memory from elsewhere that is not is refused.
template <typename T>
void check_element_aligned(const T* p, const char* what) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(p) % alignof(T) == 0, "fused_ce: ", what, " at ", static_cast<const void*>(p),
              " is not aligned to its ", alignof(T), "-byte elements");
}

template <typename scalar_t>
Variant launch_variant(int64_t num_classes, Pass pass) {
  TORCH_CHECK(num_classes <= kMaxRowLength, "fused_ce: rows of more than ", kMaxRowLength,
              " classes are not supported on CUDA, got ", num_classes);
  const VariantOverride& forced = variant_override();
  TORCH_CHECK(forced.error.empty(), forced.error);
  return resolve_variant<scalar_t>(forced.set ? &forced.variant : nullptr, current_device_limits(), num_classes, pass);
}

template <typename scalar_t>
void launch_forward(const RowProblem<scalar_t>& p, const ForwardOutputs<acc_type<scalar_t>>& out,
                    const GradInForward<scalar_t>& with_grad, cudaStream_t stream) {
  if (p.num_rows == 0) return;
  check_element_aligned(p.logits, "logits");
  if (p.target_probs) check_element_aligned(p.target_probs, "target");
  if (with_grad.grad) check_element_aligned(with_grad.grad, "grad");
  const Pass pass = with_grad.grad != nullptr ? kPassFused : kPassForward;
  run_forward(p, out, with_grad, launch_variant<scalar_t>(p.num_classes, pass), current_device_limits(),
              CudaLauncher{stream});
}

template <typename scalar_t>
void launch_backward(const RowProblem<scalar_t>& p, const BackwardInputs<acc_type<scalar_t>>& in, scalar_t* grad,
                     int64_t grad_stride, cudaStream_t stream) {
  if (p.num_rows == 0) return;
  check_element_aligned(p.logits, "logits");
  if (p.target_probs) check_element_aligned(p.target_probs, "target");
  check_element_aligned(grad, "grad");
  run_backward(p, in, grad, grad_stride, launch_variant<scalar_t>(p.num_classes, kPassBackward),
               CudaLauncher{stream});
}

template <typename scalar_t>
void launch_scale_rows(scalar_t* rows, int64_t num_rows, int64_t num_classes, int64_t stride,
                       const acc_type<scalar_t>* scale, int64_t scale_stride, cudaStream_t stream) {
  if (num_rows == 0 || num_classes == 0) return;
  check_element_aligned(rows, "rows");
  TORCH_CHECK(num_classes <= kMaxRowLength, "fused_ce: rows of more than ", kMaxRowLength,
              " classes are not supported on CUDA, got ", num_classes);
  run_scale_rows(rows, num_rows, num_classes, stride, scale, scale_stride, 4096, CudaLauncher{stream});
}

template <typename scalar_t>
void launch_entropy_forward(const EntropyArgs<scalar_t>& a, cudaStream_t stream) {
  if (a.num_rows == 0) return;
  check_element_aligned(a.logits, "logits");
  run_entropy(a, false, launch_variant<scalar_t>(a.num_classes, kPassEntropy), CudaLauncher{stream});
}

template <typename scalar_t>
void launch_entropy_backward(const EntropyArgs<scalar_t>& a, cudaStream_t stream) {
  if (a.num_rows == 0) return;
  check_element_aligned(a.logits, "logits");
  run_entropy(a, true, launch_variant<scalar_t>(a.num_classes, kPassEntropy), CudaLauncher{stream});
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
