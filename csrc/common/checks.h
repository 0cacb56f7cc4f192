// Argument checks shared by the CPU and CUDA registrations. The Python API checks
// user input first, with messages in F.cross_entropy's terms; these guard the ops
// themselves, which opcheck and torch.compile call directly.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <utility>

#include "common/ce_math.h"

namespace fused_ce {

// The dtype of the kernels' arithmetic and of `weight`: fp64 for fp64 logits, else fp32.
inline at::ScalarType accumulate_type(at::ScalarType logits) {
  return logits == at::kDouble ? at::kDouble : at::kFloat;
}

// Rows need unit stride along classes; an empty tensor holds no element to stride over.
inline bool unit_class_stride(const at::Tensor& t) { return t.numel() == 0 || t.size(1) <= 1 || t.stride(1) == 1; }

inline void check_forward_args(const at::Tensor& logits, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, double label_smoothing, double softcap) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must be 2-D [N, V], got ", logits.dim(), " dimensions");
  TORCH_CHECK_TYPE(logits.is_floating_point(), "logits must be floating point, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(unit_class_stride(logits), "logits must have unit stride along classes");
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK_VALUE(V > 0, "logits must have at least one class, got V = 0");
  TORCH_CHECK_VALUE(target.device() == logits.device(), "target must be on the logits' device (", logits.device(),
                    "), got ", target.device());
  if (target.is_floating_point()) {
    TORCH_CHECK_VALUE(target.sizes() == logits.sizes(), "probability target must have the logits' shape ",
                      logits.sizes(), ", got ", target.sizes());
    TORCH_CHECK_TYPE(target.scalar_type() == logits.scalar_type(), "probability target must have the logits' dtype (",
                     logits.scalar_type(), "), got ", target.scalar_type());
    TORCH_CHECK_VALUE(unit_class_stride(target), "probability target must have unit stride along classes");
  } else {
    TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "class-index target must be int64, got ", target.scalar_type());
    TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == N, "class-index target must have shape [", N, "], got ",
                      target.sizes());
  }
  if (weight.has_value()) {
    const at::Tensor& w = *weight;
    TORCH_CHECK_VALUE(w.device() == logits.device(), "weight must be on the logits' device (", logits.device(),
                      "), got ", w.device());
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == V, "weight must have shape [", V, "], got ", w.sizes());
    TORCH_CHECK_TYPE(w.scalar_type() == accumulate_type(logits.scalar_type()), "weight must be ",
                     accumulate_type(logits.scalar_type()), " for ", logits.scalar_type(), " logits, got ",
                     w.scalar_type());
  }
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, "label_smoothing must be in [0, 1], got ",
                    label_smoothing);
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0, "softcap must be finite and >= 0 (0 = off), got ",
                    softcap);
}

// The logits the loss sees are softcap(logit_scale * x) / temperature (LogitMap in ce_math.h).
inline void check_logit_map(double logit_scale, double temperature) {
  TORCH_CHECK_VALUE(std::isfinite(logit_scale) && logit_scale > 0.0, "logit_scale must be finite and > 0, got ",
                    logit_scale);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0, "temperature must be finite and > 0, got ",
                    temperature);
}

// Per-row tensors (statistics and coefficients) are in the accumulation dtype.
inline void check_row_vector(const at::Tensor& t, const char* name, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == logits.size(0), name, " must have shape [", logits.size(0), "], got ",
                    t.sizes());
  const auto acc = accumulate_type(logits.scalar_type());
  TORCH_CHECK_TYPE(t.scalar_type() == acc, name, " must be ", acc, " for ", logits.scalar_type(), " logits, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == logits.device(), name, " must be on the logits' device");
}

inline void check_entropy_args(const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must be 2-D [N, V], got ", logits.dim(), " dimensions");
  TORCH_CHECK_TYPE(logits.is_floating_point(), "logits must be floating point, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.size(1) > 0, "logits must have at least one class, got V = 0");
  TORCH_CHECK_VALUE(unit_class_stride(logits), "logits must have unit stride along classes");
}

inline void check_grad_buffer(const at::Tensor& grad, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(grad.sizes() == logits.sizes(), "grad must have the logits' shape ", logits.sizes(), ", got ",
                    grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == logits.scalar_type(), "grad must have the logits' dtype");
  TORCH_CHECK_VALUE(grad.device() == logits.device(), "grad must be on the logits' device");
  TORCH_CHECK_VALUE(unit_class_stride(grad), "grad must have unit stride along classes");
}

inline void check_fused_args(const at::Tensor& logits, const at::Tensor& row_scale,
                             const std::optional<at::Tensor>& z_scale) {
  check_row_vector(row_scale, "row_scale", logits);
  if (z_scale.has_value()) check_row_vector(*z_scale, "z_scale", logits);
}

inline void check_scale_rows_args(const at::Tensor& rows, const at::Tensor& scale) {
  TORCH_CHECK_VALUE(rows.dim() == 2, "rows must be 2-D, got ", rows.dim(), " dimensions");
  TORCH_CHECK_VALUE(unit_class_stride(rows), "rows must have unit stride along classes");
  TORCH_CHECK_VALUE(scale.dim() == 1 && scale.size(0) == rows.size(0), "scale must have shape [", rows.size(0),
                    "], got ", scale.sizes());
  const auto acc = accumulate_type(rows.scalar_type());
  TORCH_CHECK_TYPE(scale.scalar_type() == acc, "scale must be ", acc, " for ", rows.scalar_type(), " rows, got ",
                   scale.scalar_type());
  TORCH_CHECK_VALUE(scale.device() == rows.device(), "scale must be on the rows' device");
}

inline void check_distill_args(const at::Tensor& student, const at::Tensor& teacher, int64_t kind, double beta,
                               double temperature) {
  TORCH_CHECK_VALUE(student.dim() == 2, "student logits must be 2-D [N, V], got ", student.dim(), " dimensions");
  TORCH_CHECK_TYPE(student.is_floating_point(), "student logits must be floating point, got ", student.scalar_type());
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), "teacher logits must have the student's shape ",
                    student.sizes(), ", got ", teacher.sizes());
  TORCH_CHECK_TYPE(teacher.scalar_type() == student.scalar_type(), "teacher logits must have the student's dtype (",
                   student.scalar_type(), "), got ", teacher.scalar_type());
  TORCH_CHECK_VALUE(teacher.device() == student.device(), "teacher logits must be on the student's device");
  TORCH_CHECK_VALUE(unit_class_stride(student) && unit_class_stride(teacher),
                    "student and teacher logits must have unit stride along classes");
  TORCH_CHECK_VALUE(kind >= 0 && kind <= 2, "kind must be 0 (forward KL), 1 (reverse KL) or 2 (JSD), got ", kind);
  TORCH_CHECK_VALUE(beta >= 0.0 && beta <= 1.0, "beta must be in [0, 1], got ", beta);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0, "temperature must be finite and > 0, got ",
                    temperature);
}

// distill_backward's: forward's arguments, and forward's per-row outputs and the upstream
// gradient, each [N] in the accumulation dtype.
inline void check_distill_backward_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& aux,
                                        const at::Tensor& lse_student, const at::Tensor& lse_teacher,
                                        const at::Tensor& grad_loss, int64_t kind, double beta, double temperature) {
  check_distill_args(student, teacher, kind, beta, temperature);
  for (const auto& [t, name] : {std::pair{&aux, "aux"},
                                {&lse_student, "lse_student"},
                                {&lse_teacher, "lse_teacher"},
                                {&grad_loss, "grad_loss"}}) {
    check_row_vector(*t, name, student);
  }
}

// The slice of the vocabulary the logits hold (see ops.cpp): classes
// [start, start + V) of total. vocab_total = -1 means the whole vocabulary.
struct VocabSlice {
  int64_t start;
  int64_t total;
};

inline VocabSlice vocab_slice(const at::Tensor& logits, int64_t vocab_start, int64_t vocab_total) {
  const int64_t V = logits.size(1);
  const int64_t total = vocab_total < 0 ? V : vocab_total;
  TORCH_CHECK_VALUE(vocab_total >= -1, "vocab_total must be -1 (the logits hold every class) or >= V, got ",
                    vocab_total);
  TORCH_CHECK_VALUE(vocab_start >= 0 && vocab_start + V <= total, "vocab_start (", vocab_start, ") + V (", V,
                    ") must lie within vocab_total (", total, ")");
  return {vocab_start, total};
}

inline TargetSpec target_spec(double label_smoothing, const VocabSlice& slice) {
  return {1.0 - label_smoothing, label_smoothing / static_cast<double>(slice.total)};
}

}  // namespace fused_ce
