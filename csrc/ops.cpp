// The op schemas of fused_ce, defined once for every backend.
//
// CPU implementations register in cpu/dispatch.cpp, CUDA ones in cuda/*.cu;
// fake (meta) kernels and autograd are registered from Python (fused_ce/ops.py).
// Shapes: logits [N, V] with unit class stride (any row stride); target is
// [N] int64 class indices or [N, V] probabilities in the logits' dtype; weight
// [V] float32. Every per-row output is float32 [N].
#include <Python.h>
#include <torch/library.h>

// Importing fused_ce._C loads this library, which runs the registrations below.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "fused_ce's compiled kernels; use them through the fused_ce package",
      -1,    // size
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fused_ce, m) {
  // Per-row statistics of the loss sum_c T_c (lse - z_c) (see common/ce_math.h):
  // loss (0 for ignored rows), lse, and mass = sum_c T_c.
  m.def(
      "cross_entropy_forward(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, float softcap) -> (Tensor loss, Tensor lse, Tensor mass)");
  // grad_c = p_coef * softmax_c - t_coef * T_c, times the soft-cap slope.
  m.def(
      "cross_entropy_backward(Tensor logits, Tensor target, Tensor? weight, Tensor lse, "
      "Tensor p_coef, Tensor t_coef, int ignore_index, float label_smoothing, float softcap) -> Tensor");
}
