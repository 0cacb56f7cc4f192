// The op schemas of fused_ce, defined once for every backend.
//
// CPU implementations register in cpu/dispatch.cpp, CUDA ones in cuda/*.cu;
// fake (meta) kernels and autograd are registered from Python (fused_ce/ops.py).
// Shapes: logits [N, V] with unit class stride (any row stride); target is
// [N] int64 class indices or [N, V] probabilities in the logits' dtype; weight
// [V], and every per-row tensor [N], in the accumulation dtype: float64 for
// float64 logits, float32 otherwise.
#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

// Importing fused_ce._C loads this library, which runs the registrations below.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "fused_ce's compiled kernels; use them through the fused_ce package",
      -1,  // size
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

// The options every cross-entropy op takes after its tensors: the ignored class, the
// label smoothing, the soft-cap (0 = off), the slice of the vocabulary the logits hold,
// and the logit scale and temperature (LogitMap in common/ce_math.h).
#define FUSED_CE_OPTIONS                                                                            \
  "int ignore_index, float label_smoothing, float softcap, int vocab_start=0, int vocab_total=-1, " \
  "float logit_scale=1.0, float temperature=1.0"

TORCH_LIBRARY(fused_ce, m) {
  // Every op below reads logits [N, V] that may be a slice of a larger vocabulary:
  // classes [vocab_start, vocab_start + V) of vocab_total (-1: V, the whole of it).
  // Class-index targets are then global: one outside the slice adds no one-hot
  // entry here, and label smoothing spreads over vocab_total classes. Partial
  // statistics of the slices merge into the full row's (fused_ce/distributed/).
  //
  // Per-row statistics of the loss sum_c T_c (lse - z_c) (see common/ce_math.h):
  // loss (0 for ignored rows), lse, and mass = sum_c T_c.
  m.def("cross_entropy_forward(Tensor logits, Tensor target, Tensor? weight, " FUSED_CE_OPTIONS
        ") -> (Tensor loss, Tensor lse, Tensor mass)");
  // grad_c = p_coef * softmax_c - t_coef * T_c, times the soft-cap slope.
  m.def(
      "cross_entropy_backward(Tensor logits, Tensor target, Tensor? weight, Tensor lse, Tensor p_coef, "
      "Tensor t_coef, " FUSED_CE_OPTIONS ") -> Tensor");
  // The same gradient written into `grad` (which must not overlap the logits), except
  // for rows i with keep_where_one[i] == 1, which keep what they hold (the fused op's
  // backward: see fused_ce/ops.py).
  m.def(
      "cross_entropy_backward_into_(Tensor(a!) grad, Tensor logits, Tensor target, Tensor? weight, Tensor lse, "
      "Tensor p_coef, Tensor t_coef, Tensor keep_where_one, " FUSED_CE_OPTIONS ") -> ()");
  // The same gradient written over the logits themselves (the linear path's
  // blocks: each element is read, then overwritten, by the thread that owns it).
  m.def(
      "cross_entropy_backward_(Tensor(a!) logits, Tensor target, Tensor? weight, Tensor lse, Tensor p_coef, "
      "Tensor t_coef, " FUSED_CE_OPTIONS ") -> ()");
  // The training hot path: one pass computes the per-row objective
  //   row_scale_i * loss_i + z_scale_i * lse_i^2
  // and writes its gradient (see objective() in common/ce_math.h). Backward then
  // only scales the rows by the upstream gradient (scale_rows_).
  m.def(
      "cross_entropy_fused(Tensor logits, Tensor target, Tensor? weight, Tensor row_scale, Tensor? "
      "z_scale, " FUSED_CE_OPTIONS ") -> (Tensor objective, Tensor lse, Tensor mass, Tensor grad)");
  // The same, writing the gradient over the logits.
  m.def(
      "cross_entropy_fused_(Tensor(a!) logits, Tensor target, Tensor? weight, Tensor row_scale, Tensor? "
      "z_scale, " FUSED_CE_OPTIONS ") -> (Tensor objective, Tensor lse, Tensor mass)");
  // The .stats overloads: the same, and the row's prediction in the same pass -- the
  // argmax of the logits the loss sees (the lowest index among ties, a NaN the
  // largest, as torch.argmax; within these logits) and that logit, for merging slices.
  m.def("cross_entropy_forward.stats(Tensor logits, Tensor target, Tensor? weight, " FUSED_CE_OPTIONS
        ") -> (Tensor loss, Tensor lse, Tensor mass, Tensor argmax, Tensor max_logit)");
  m.def(
      "cross_entropy_fused.stats(Tensor logits, Tensor target, Tensor? weight, Tensor row_scale, "
      "Tensor? z_scale, " FUSED_CE_OPTIONS
      ") -> (Tensor objective, Tensor lse, Tensor mass, Tensor grad, Tensor argmax, Tensor max_logit)");
  m.def(
      "cross_entropy_fused_.stats(Tensor(a!) logits, Tensor target, Tensor? weight, Tensor row_scale, "
      "Tensor? z_scale, " FUSED_CE_OPTIONS
      ") -> (Tensor objective, Tensor lse, Tensor mass, Tensor argmax, Tensor max_logit)");
  // rows[i] *= scale[i]; a row whose scale is exactly 1 is not touched, which is
  // decided on the device (no host synchronisation).
  m.def("scale_rows_(Tensor(a!) rows, Tensor scale) -> ()");
  // Entropy of softmax(logits) per row, in one online pass (EntropyStats in
  // common/ce_math.h), with the lse; and its backward: grad_c = g p_c (lse - z_c - H).
  m.def("entropy_forward(Tensor logits, float temperature=1.0) -> (Tensor entropy, Tensor lse)");
  m.def(
      "entropy_backward(Tensor logits, Tensor entropy, Tensor lse, Tensor grad_entropy, float temperature=1.0) -> "
      "Tensor");
  // Distillation (common/distill_math.h): student and teacher logits [N, V] of one
  // dtype; kind 0 forward KL, 1 reverse KL, 2 JSD(beta); both rows scaled by
  // 1/temperature. Forward gives per row the divergence, its statistic R (aux) and
  // both rows' lse; backward the student's gradient for an upstream grad_loss [N].
  m.def(
      "distill_forward(Tensor student, Tensor teacher, int kind, float beta, float temperature) -> (Tensor loss, "
      "Tensor aux, Tensor lse_student, Tensor lse_teacher)");
  m.def(
      "distill_backward(Tensor student, Tensor teacher, Tensor aux, Tensor lse_student, Tensor lse_teacher, "
      "Tensor grad_loss, int kind, float beta, float temperature) -> Tensor");
}

namespace {

// Every op whose schema writes a tensor (a `Tensor(a!)` argument) bumps that
// tensor's version counter, as ATen's own in-place ops do, so that autograd raises
// when a tensor saved for a backward pass was overwritten instead of using the new
// values. One boxed kernel serves them all, reading the written arguments off the
// schema (tests/test_ops.py checks every mutating op of the library against it).
void bump_versions_of_written(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const size_t first = stack->size() - arguments.size();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < arguments.size(); ++i) {
    const c10::AliasInfo* alias = arguments[i].alias_info();
    if (alias != nullptr && alias->isWrite()) written.push_back((*stack)[first + i].toTensor());
  }
  {
    const c10::impl::ExcludeDispatchKeyGuard below(c10::DispatchKey::ADInplaceOrView);
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_ce, ADInplaceOrView, m) {
  for (const char* name : {"scale_rows_", "cross_entropy_fused_", "cross_entropy_fused_.stats",
                           "cross_entropy_backward_into_", "cross_entropy_backward_"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&bump_versions_of_written>());
  }
}
