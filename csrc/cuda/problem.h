// Builds a kernel launch's RowProblem from the ops' (already checked) arguments.
// Shared by dispatch.cpp and the CPU emulation of the kernels in tests/.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/checks.h"
#include "cuda/launch.h"

namespace fused_ce::cuda {

// target: int64 [N] (contiguous) or probabilities [N, V]; weight: contiguous or undefined.
template <typename scalar_t>
RowProblem<scalar_t> make_problem(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                                  int64_t ignore_index, double label_smoothing, double softcap, int64_t vocab_start,
                                  int64_t vocab_total, double logit_scale, double temperature) {
  using acc_t = acc_type<scalar_t>;
  const VocabSlice vocab = vocab_slice(logits, vocab_start, vocab_total);
  const TargetSpec spec = target_spec(label_smoothing, vocab);
  RowProblem<scalar_t> p{};
  p.logits = logits.const_data_ptr<scalar_t>();
  p.logits_stride = logits.stride(0);
  p.num_rows = logits.size(0);
  p.num_classes = logits.size(1);
  if (target.is_floating_point()) {
    p.target_probs = target.const_data_ptr<scalar_t>();
    p.target_stride = target.stride(0);
  } else {
    p.target_index = target.const_data_ptr<int64_t>();
  }
  p.weight = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
  p.ignore_index = ignore_index;
  p.vocab_start = vocab.start;
  p.vocab_total = vocab.total;
  p.on_target = static_cast<acc_t>(spec.on_target);
  p.smoothing = static_cast<acc_t>(spec.smoothing);
  p.map = make_logit_map<acc_t>(logit_scale, softcap, temperature);
  return p;
}

}  // namespace fused_ce::cuda
