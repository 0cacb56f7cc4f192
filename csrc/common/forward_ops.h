// The six forward ops of the schema (ops.cpp) -- the statistics, the fused gradient out of
// place and over the logits, each also as its .stats overload -- written once over a
// backend's single entry point, so that the CPU and CUDA registrations cannot drift:
//
//   Stats forward_into(logits, target, weight, row_scale*, z_scale, ignore_index,
//                      label_smoothing, softcap, vocab_start, vocab_total, logit_scale,
//                      temperature, grad*, with_argmax)
//
// returns (loss or objective, lse, mass, argmax, max_logit) -- the last two empty unless
// with_argmax -- and with grad (row_scale given) writes the gradient into *grad in the same
// pass; empty_grad(sizes, options) allocates the out-of-place gradient.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fused_ce {

using ForwardStats = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using ForwardIntoFn = ForwardStats (*)(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                       const at::Tensor*, const std::optional<at::Tensor>&, int64_t, double, double,
                                       int64_t, int64_t, double, double, const at::Tensor*, bool);
using EmptyGradFn = at::Tensor (*)(at::IntArrayRef, const at::TensorOptions&);

template <ForwardIntoFn forward_into, EmptyGradFn empty_grad>
struct ForwardOps {
  using Weight = std::optional<at::Tensor>;
  using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
  using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  using Tensor6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

  // cross_entropy_forward(.stats)
  static ForwardStats forward_stats(const at::Tensor& logits, const at::Tensor& target, const Weight& weight,
                                    int64_t ignore_index, double label_smoothing, double softcap, int64_t vocab_start,
                                    int64_t vocab_total, double logit_scale, double temperature) {
    return forward_into(logits, target, weight, nullptr, std::nullopt, ignore_index, label_smoothing, softcap,
                        vocab_start, vocab_total, logit_scale, temperature, nullptr, true);
  }

  static Tensor3 forward(const at::Tensor& logits, const at::Tensor& target, const Weight& weight, int64_t ignore_index,
                         double label_smoothing, double softcap, int64_t vocab_start, int64_t vocab_total,
                         double logit_scale, double temperature) {
    auto [loss, lse, mass, argmax, max_logit] =
        forward_into(logits, target, weight, nullptr, std::nullopt, ignore_index, label_smoothing, softcap, vocab_start,
                     vocab_total, logit_scale, temperature, nullptr, false);
    return {loss, lse, mass};
  }

  // cross_entropy_fused(.stats): the gradient into a new buffer.
  static Tensor6 fused_stats(const at::Tensor& logits, const at::Tensor& target, const Weight& weight,
                             const at::Tensor& row_scale, const Weight& z_scale, int64_t ignore_index,
                             double label_smoothing, double softcap, int64_t vocab_start, int64_t vocab_total,
                             double logit_scale, double temperature) {
    at::Tensor grad = empty_grad(logits.sizes(), logits.options());
    auto [objective, lse, mass, argmax, max_logit] =
        forward_into(logits, target, weight, &row_scale, z_scale, ignore_index, label_smoothing, softcap, vocab_start,
                     vocab_total, logit_scale, temperature, &grad, true);
    return {objective, lse, mass, grad, argmax, max_logit};
  }

  static Tensor4 fused(const at::Tensor& logits, const at::Tensor& target, const Weight& weight,
                       const at::Tensor& row_scale, const Weight& z_scale, int64_t ignore_index, double label_smoothing,
                       double softcap, int64_t vocab_start, int64_t vocab_total, double logit_scale,
                       double temperature) {
    at::Tensor grad = empty_grad(logits.sizes(), logits.options());
    auto [objective, lse, mass, argmax, max_logit] =
        forward_into(logits, target, weight, &row_scale, z_scale, ignore_index, label_smoothing, softcap, vocab_start,
                     vocab_total, logit_scale, temperature, &grad, false);
    return {objective, lse, mass, grad};
  }

  // cross_entropy_fused_(.stats): the gradient over the logits.
  static ForwardStats fused_inplace_stats(const at::Tensor& logits, const at::Tensor& target, const Weight& weight,
                                          const at::Tensor& row_scale, const Weight& z_scale, int64_t ignore_index,
                                          double label_smoothing, double softcap, int64_t vocab_start,
                                          int64_t vocab_total, double logit_scale, double temperature) {
    return forward_into(logits, target, weight, &row_scale, z_scale, ignore_index, label_smoothing, softcap,
                        vocab_start, vocab_total, logit_scale, temperature, &logits, true);
  }

  static Tensor3 fused_inplace(const at::Tensor& logits, const at::Tensor& target, const Weight& weight,
                               const at::Tensor& row_scale, const Weight& z_scale, int64_t ignore_index,
                               double label_smoothing, double softcap, int64_t vocab_start, int64_t vocab_total,
                               double logit_scale, double temperature) {
    auto [objective, lse, mass, argmax, max_logit] =
        forward_into(logits, target, weight, &row_scale, z_scale, ignore_index, label_smoothing, softcap, vocab_start,
                     vocab_total, logit_scale, temperature, &logits, false);
    return {objective, lse, mass};
  }

  // The six registrations, for TORCH_LIBRARY_IMPL(fused_ce, <backend>, m).
  template <typename Library>
  static void register_ops(Library& m) {
    m.impl("cross_entropy_forward", &forward);
    m.impl("cross_entropy_forward.stats", &forward_stats);
    m.impl("cross_entropy_fused", &fused);
    m.impl("cross_entropy_fused.stats", &fused_stats);
    m.impl("cross_entropy_fused_", &fused_inplace);
    m.impl("cross_entropy_fused_.stats", &fused_inplace_stats);
  }
};

}  // namespace fused_ce
