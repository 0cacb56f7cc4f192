// From a launch's variant and options to a kernel instantiation and its launch shape,
// for any launcher: launch.cuh's (CUDA streams) and tests/cuda_emulator's (threads on
// the CPU), so that the emulator runs exactly what a GPU would.
//
// A launcher is called as launch(kernel, LaunchShape, kernel arguments...).
//
// The variant a launch runs: resolve_variant -- FUSED_CE_CUDA_VARIANT's where it can take
// the launch, else the dispatch table's (variants.h).
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#include "cuda/kernels.cuh"
#include "cuda/single_read.cuh"
#include "cuda/variants.h"

namespace fused_ce::cuda {

// Column offsets within a row are int32, with room for a batch of vectors past its end.
constexpr int64_t kMaxRowLength = std::numeric_limits<int>::max() - (1 << 20);

struct LaunchShape {
  int64_t grid;  // blocks
  int block;     // threads per block
  size_t smem;   // bytes of dynamic shared memory per block
  int cluster;   // blocks per cluster (1: no cluster)
};

template <int kThreads>
LaunchShape stream_shape(int64_t num_rows) {
  constexpr int kRowsPerBlock = block_size<kThreads>() / kThreads;
  return {(num_rows + kRowsPerBlock - 1) / kRowsPerBlock, block_size<kThreads>(), 0, 1};
}

// fn(std::integral_constant<int, threads>) for a streaming mapping: 32, 256, 512 or 1024.
template <typename Fn>
void dispatch_threads(int threads, Fn&& fn) {
  switch (threads) {
    case 32: fn(std::integral_constant<int, 32>{}); break;
    case 256: fn(std::integral_constant<int, 256>{}); break;
    case 1024: fn(std::integral_constant<int, 1024>{}); break;
    default: fn(std::integral_constant<int, 512>{}); break;
  }
}

constexpr unsigned kAllOptions = (1u << kOptionBits) - 1;

// What the device offers the variants.
struct DeviceLimits {
  int compute_capability;       // major * 10 + minor
  size_t single_read_smem_per_cta;  // a CTA's share of an SM's shared memory (see launch.cuh)
  int max_cluster;
};

inline bool single_read_fits(const DeviceLimits& d, int64_t num_classes, int element_size, Pass pass) {
  return d.compute_capability >= 90 && (pass & (kPassForward | kPassFused)) &&
         single_read_shape(num_classes, element_size, d.single_read_smem_per_cta, d.max_cluster).cluster > 0;
}

// forced: FUSED_CE_CUDA_VARIANT's variant, or nullptr.
template <typename scalar_t>
Variant resolve_variant(const Variant* forced, const DeviceLimits& d, int64_t num_classes, Pass pass) {
  const bool fits = single_read_fits(d, num_classes, sizeof(scalar_t), pass);
  if (forced != nullptr && (*forced != Variant::kSingleRead || fits)) return *forced;
  return table_entry(d.compute_capability, dtype_bit<scalar_t>(), num_classes, pass, !fits).variant;
}

// variant: resolve_variant's.
template <typename scalar_t, typename Launcher>
void run_forward(const RowProblem<scalar_t>& p, const ForwardOutputs<acc_type<scalar_t>>& out,
                 const GradInForward<scalar_t>& with_grad, Variant variant, const DeviceLimits& limits,
                 Launcher&& launch) {
  dispatch_options<kAllOptions>(row_option_bits(p, with_grad.grad != nullptr), [&](auto opts) {
    constexpr unsigned kOpts = decltype(opts)::value;
    if (variant == Variant::kSingleRead) {
      const SingleReadShape shape =
          single_read_shape(p.num_classes, sizeof(scalar_t), limits.single_read_smem_per_cta, limits.max_cluster);
      const LaunchShape grid{p.num_rows * shape.cluster, kSingleReadThreads, shape.smem_bytes, shape.cluster};
      launch(single_read_kernel<scalar_t, kOpts>, grid, p, out, with_grad, shape);
      return;
    }
    dispatch_threads(stream_threads(variant), [&](auto threads) {
      constexpr int kThreads = decltype(threads)::value;
      launch(forward_kernel<scalar_t, kThreads, kOpts>, stream_shape<kThreads>(p.num_rows), p, out, with_grad);
    });
  });
}

template <typename scalar_t, typename Launcher>
void run_backward(const RowProblem<scalar_t>& p, const BackwardInputs<acc_type<scalar_t>>& in, scalar_t* grad,
                  int64_t grad_stride, Variant variant, Launcher&& launch) {
  dispatch_options<kAllOptions & ~kOptGrad>(row_option_bits(p, false), [&](auto opts) {
    constexpr unsigned kOpts = decltype(opts)::value;
    dispatch_threads(stream_threads(variant), [&](auto threads) {
      constexpr int kThreads = decltype(threads)::value;
      launch(backward_kernel<scalar_t, kThreads, kOpts>, stream_shape<kThreads>(p.num_rows), p, in, grad, grad_stride);
    });
  });
}

// Entropy forward, then (with a.grad) backward.
template <typename scalar_t, typename Launcher>
void run_entropy(const EntropyArgs<scalar_t>& a, bool backward, Variant variant, Launcher&& launch) {
  dispatch_threads(stream_threads(variant), [&](auto threads) {
    constexpr int kThreads = decltype(threads)::value;
    if (backward) {
      launch(entropy_backward_kernel<scalar_t, kThreads>, stream_shape<kThreads>(a.num_rows), a);
    } else {
      launch(entropy_forward_kernel<scalar_t, kThreads>, stream_shape<kThreads>(a.num_rows), a);
    }
  });
}

template <typename scalar_t, typename Launcher>
void run_scale_rows(scalar_t* rows, int64_t num_rows, int64_t num_classes, int64_t stride,
                    const acc_type<scalar_t>* scale, int64_t scale_stride, int64_t max_blocks, Launcher&& launch) {
  // A grid-stride loop over rows: with scale 1 each block reads a few scalars and exits.
  const LaunchShape shape{num_rows < max_blocks ? num_rows : max_blocks, kScaleThreads, 0, 1};
  launch(scale_rows_kernel<scalar_t>, shape, rows, num_rows, num_classes, stride, scale, scale_stride);
}

}  // namespace fused_ce::cuda
