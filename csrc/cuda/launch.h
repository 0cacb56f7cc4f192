// Host-side interface of the CUDA kernels: what a launch needs, in raw pointers.
// The kernels are instantiated per dtype in launch_<dtype>.cu; dispatch.cpp
// checks arguments, allocates outputs and calls these.
#pragma once

#ifdef FUSED_CE_CUDA_EMULATION  // tests/cuda_emulator: no CUDA toolkit needed
typedef struct CUstream_st* cudaStream_t;
#else
#include <cuda_runtime_api.h>
#endif

#include <cstdint>
#include <type_traits>

namespace fused_ce::cuda {

// fp32 arithmetic for fp32/fp16/bf16 logits, fp64 for fp64.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// One call's rows and target distribution T (see common/ce_math.h).
template <typename scalar_t>
struct RowProblem {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* logits;  // [num_rows, num_classes], unit class stride
  int64_t logits_stride;
  int64_t num_rows;
  int64_t num_classes;
  const int64_t* target_index;   // [num_rows] class indices, or nullptr
  const scalar_t* target_probs;  // [num_rows, num_classes] probabilities, or nullptr
  int64_t target_stride;
  const acc_t* weight;  // [num_classes], or nullptr
  int64_t ignore_index;
  acc_t on_target;  // 1 - label_smoothing
  acc_t smoothing;  // label_smoothing / num_classes
  acc_t cap;        // soft-cap, 0 = off
  acc_t inv_cap;
};

struct ForwardOutputs {
  float* loss;  // [num_rows]
  float* lse;
  float* mass;
};

struct BackwardInputs {
  const float* lse;  // [num_rows]
  const float* p_coef;
  const float* t_coef;
};

template <typename scalar_t>
void launch_forward(const RowProblem<scalar_t>& problem, const ForwardOutputs& out, cudaStream_t stream);

// grad: [num_rows, num_classes], contiguous.
template <typename scalar_t>
void launch_backward(const RowProblem<scalar_t>& problem, const BackwardInputs& in, scalar_t* grad,
                     cudaStream_t stream);

}  // namespace fused_ce::cuda
