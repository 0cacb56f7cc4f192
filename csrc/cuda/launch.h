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

#include "common/ce_math.h"

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
  int64_t vocab_start;  // the logits hold classes [vocab_start, vocab_start + num_classes) of vocab_total;
  int64_t vocab_total;  // class-index targets are global
  acc_t on_target;      // 1 - label_smoothing
  acc_t smoothing;      // label_smoothing / num_classes
  LogitMap<acc_t> map;  // the logits the loss sees: softcap(logit_scale * x) / temperature
};

// Per-row tensors are in the accumulation dtype acc_t.
template <typename acc_t>
struct ForwardOutputs {
  acc_t* loss;  // [num_rows]: the loss, or with a gradient in the forward pass the objective
  acc_t* lse;
  acc_t* mass;                 // may be nullptr
  int64_t* argmax = nullptr;   // [num_rows], or nullptr: the row's argmax (the .stats overloads) ...
  acc_t* max_logit = nullptr;  // ... and its logit after the logit map; both or neither
};

// The gradient written by the forward pass (see objective() in common/ce_math.h).
template <typename scalar_t>
struct GradInForward {
  const acc_type<scalar_t>* row_scale = nullptr;  // [num_rows]
  const acc_type<scalar_t>* z_scale = nullptr;    // [num_rows], or nullptr (no z-loss)
  scalar_t* grad = nullptr;                       // [num_rows, num_classes], unit class stride; may be the logits
  int64_t grad_stride = 0;
};

template <typename acc_t>
struct BackwardInputs {
  const acc_t* lse;  // [num_rows]
  const acc_t* p_coef;
  const acc_t* t_coef;
  const acc_t* keep_where_one = nullptr;  // rows i with keep_where_one[i * keep_stride] == 1 are not written
  int64_t keep_stride = 0;
};

// with_grad.grad == nullptr: statistics only.
template <typename scalar_t>
void launch_forward(const RowProblem<scalar_t>& problem, const ForwardOutputs<acc_type<scalar_t>>& out,
                    const GradInForward<scalar_t>& with_grad, cudaStream_t stream);

// grad: [num_rows, num_classes] with row stride grad_stride.
template <typename scalar_t>
void launch_backward(const RowProblem<scalar_t>& problem, const BackwardInputs<acc_type<scalar_t>>& in, scalar_t* grad,
                     int64_t grad_stride, cudaStream_t stream);

// Entropy of softmax rows: forward writes entropy and lse, backward reads them
// with grad_entropy and writes grad [num_rows, num_classes] (contiguous).
template <typename scalar_t>
struct EntropyArgs {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* logits;
  int64_t logits_stride;
  int64_t num_rows;
  int64_t num_classes;
  acc_t* entropy;
  acc_t* lse;
  const acc_t* grad_entropy = nullptr;
  int64_t grad_entropy_stride = 0;
  acc_t post = 1;  // 1 / temperature: the entropy of softmax(post * x)
  scalar_t* grad = nullptr;
};

template <typename scalar_t>
void launch_entropy_forward(const EntropyArgs<scalar_t>& args, cudaStream_t stream);

template <typename scalar_t>
void launch_entropy_backward(const EntropyArgs<scalar_t>& args, cudaStream_t stream);

template <typename scalar_t>
void launch_scale_rows(scalar_t* rows, int64_t num_rows, int64_t num_classes, int64_t stride,
                       const acc_type<scalar_t>* scale, int64_t scale_stride, cudaStream_t stream);

}  // namespace fused_ce::cuda
