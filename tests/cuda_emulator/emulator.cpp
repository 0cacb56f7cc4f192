// The CUDA kernels of csrc/cuda, run on the CPU through cuda_shim.h, with the
// variant (csrc/cuda/variants.h) chosen by the caller so that every variant is
// exercised on small shapes -- launched by run.cuh, as on a GPU. Built by
// tests/test_cuda_emulated.py.
// clang-format off
#include "cuda_shim.h"  // first: it defines the CUDA keywords kernels.cuh uses
// clang-format on

#include <ATen/Dispatch.h>
#include <torch/extension.h>

#include "cuda/problem.h"
#include "cuda/run.cuh"

namespace fused_ce::cuda {

// run.cuh's launcher for the emulator: the same kernels and launch shapes as on a GPU.
struct EmulatorLauncher {
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), const LaunchShape& shape, const Args&... args) const {
    emu::launch(shape.grid, static_cast<unsigned>(shape.block), shape.smem, shape.cluster, kernel, args...);
  }
};

// An sm_90 whose CTAs get single_read_smem bytes each for the single-read variant (tests
// make it small, so that short rows need clusters).
size_t single_read_smem = 113 * 1024;

void set_single_read_smem(int64_t bytes) { single_read_smem = static_cast<size_t>(bytes); }

DeviceLimits emulated_device() { return {90, single_read_smem, kMaxCluster}; }

// The variant a launch of `pass` over rows of num_classes runs when `name` is forced, as
// launch.cuh resolves it on an sm_90.
template <typename scalar_t>
Variant variant_named(const std::string& name, int64_t num_classes, Pass pass) {
  const VariantOverride v = parse_variant_override(name.c_str());
  TORCH_CHECK(v.set, v.error);
  return resolve_variant<scalar_t>(&v.variant, emulated_device(), num_classes, pass);
}

// The variant's name as resolved: what a GPU would run.
std::string resolved_variant(const std::string& name, int64_t num_classes, const std::string& pass,
                             int64_t element_size) {
  const Pass p = pass == "forward" ? kPassForward : pass == "fused" ? kPassFused : kPassBackward;
  const Variant v = element_size == 2 ? variant_named<c10::BFloat16>(name, num_classes, p)
                                      : variant_named<float>(name, num_classes, p);
  return kVariantNames[static_cast<int>(v)];
}

// The row's argmax and its logit (the .stats overloads), where asked: [N] tensors or empty.
struct ArgmaxTensors {
  at::Tensor index, value;

  ArgmaxTensors(const at::Tensor& logits, bool with_argmax) {
    const int64_t n = with_argmax ? logits.size(0) : 0;
    index = at::empty({n}, logits.options().dtype(at::kLong));
    value = at::empty({n}, logits.options().dtype(accumulate_type(logits.scalar_type())));
  }

  template <typename acc_t>
  void into(ForwardOutputs<acc_t>& out) {
    if (index.numel() == 0) return;
    out.argmax = index.data_ptr<int64_t>();
    out.max_logit = value.data_ptr<acc_t>();
  }
};

// with_argmax: loss, lse, mass, argmax, max_logit (else the first three).
std::vector<at::Tensor> forward(const at::Tensor& logits, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, int64_t ignore_index, double label_smoothing,
                                double softcap, int64_t vocab_start, int64_t vocab_total, const std::string& variant,
                                double logit_scale, double temperature, bool with_argmax) {
  check_forward_args(logits, target, weight, label_smoothing, softcap);
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor rows = target.is_floating_point() ? target : target.contiguous();
  const auto opts = logits.options().dtype(accumulate_type(logits.scalar_type()));
  at::Tensor loss = at::empty({logits.size(0)}, opts), lse = at::empty_like(loss), mass = at::empty_like(loss);
  ArgmaxTensors argmax(logits, with_argmax);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "emulated_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto p = make_problem<scalar_t>(logits, rows, w, ignore_index, label_smoothing, softcap, vocab_start,
                                          vocab_total, logit_scale, temperature);
    ForwardOutputs<acc_t> out{loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), mass.data_ptr<acc_t>()};
    argmax.into(out);
    run_forward(p, out, GradInForward<scalar_t>{}, variant_named<scalar_t>(variant, p.num_classes, kPassForward),
                emulated_device(), EmulatorLauncher{});
  });
  if (with_argmax) return {loss, lse, mass, argmax.index, argmax.value};
  return {loss, lse, mass};
}

// keep: rows whose keep_where_one is 1 keep grad_in's values (the fused op's backward).
at::Tensor backward(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                    const at::Tensor& lse, const at::Tensor& p_coef, const at::Tensor& t_coef, int64_t ignore_index,
                    double label_smoothing, double softcap, int64_t vocab_start, int64_t vocab_total,
                    const std::string& variant, const std::optional<at::Tensor>& keep_where_one,
                    const std::optional<at::Tensor>& grad_in, double logit_scale, double temperature) {
  check_forward_args(logits, target, weight, label_smoothing, softcap);
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor rows = target.is_floating_point() ? target : target.contiguous();
  at::Tensor grad = grad_in.has_value() ? grad_in->clone() : at::empty(logits.sizes(), logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "emulated_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto p = make_problem<scalar_t>(logits, rows, w, ignore_index, label_smoothing, softcap, vocab_start,
                                          vocab_total, logit_scale, temperature);
    BackwardInputs<acc_t> in{lse.const_data_ptr<acc_t>(), p_coef.const_data_ptr<acc_t>(),
                             t_coef.const_data_ptr<acc_t>()};
    if (keep_where_one.has_value()) {
      in.keep_where_one = keep_where_one->const_data_ptr<acc_t>();
      in.keep_stride = keep_where_one->stride(0);
    }
    run_backward(p, in, grad.data_ptr<scalar_t>(), grad.stride(0),
                 variant_named<scalar_t>(variant, p.num_classes, kPassBackward), EmulatorLauncher{});
  });
  return grad;
}

// The gradient-in-forward kernel; inplace writes the gradient over the logits.
std::vector<at::Tensor> fused(const at::Tensor& logits, const at::Tensor& target,
                              const std::optional<at::Tensor>& weight, const at::Tensor& row_scale,
                              const std::optional<at::Tensor>& z_scale, int64_t ignore_index, double label_smoothing,
                              double softcap, int64_t vocab_start, int64_t vocab_total, const std::string& variant,
                              bool inplace, double logit_scale, double temperature, bool with_argmax) {
  check_forward_args(logits, target, weight, label_smoothing, softcap);
  check_fused_args(logits, row_scale, z_scale);
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor rows = target.is_floating_point() ? target : target.contiguous();
  const auto opts = logits.options().dtype(accumulate_type(logits.scalar_type()));
  at::Tensor objective = at::empty({logits.size(0)}, opts), lse = at::empty_like(objective);
  at::Tensor mass = at::empty_like(objective);
  at::Tensor grad = inplace ? logits : at::empty(logits.sizes(), logits.options());
  ArgmaxTensors argmax(logits, with_argmax);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "emulated_fused", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto p = make_problem<scalar_t>(logits, rows, w, ignore_index, label_smoothing, softcap, vocab_start,
                                          vocab_total, logit_scale, temperature);
    ForwardOutputs<acc_t> out{objective.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), mass.data_ptr<acc_t>()};
    argmax.into(out);
    GradInForward<scalar_t> with_grad;
    with_grad.row_scale = row_scale.const_data_ptr<acc_t>();
    with_grad.z_scale = z_scale.has_value() ? z_scale->const_data_ptr<acc_t>() : nullptr;
    with_grad.grad = grad.data_ptr<scalar_t>();
    with_grad.grad_stride = grad.stride(0);
    run_forward(p, out, with_grad, variant_named<scalar_t>(variant, p.num_classes, kPassFused), emulated_device(),
                EmulatorLauncher{});
  });
  if (with_argmax) return {objective, lse, mass, grad, argmax.index, argmax.value};
  return {objective, lse, mass, grad};
}

std::vector<at::Tensor> entropy(const at::Tensor& logits, const at::Tensor& grad_entropy, const std::string& variant,
                                double temperature) {
  check_entropy_args(logits);
  const auto opts = logits.options().dtype(accumulate_type(logits.scalar_type()));
  at::Tensor entropy = at::empty({logits.size(0)}, opts), lse = at::empty_like(entropy);
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "emulated_entropy", [&] {
    using acc_t = acc_type<scalar_t>;
    EntropyArgs<scalar_t> a{logits.const_data_ptr<scalar_t>(), logits.stride(0),     logits.size(0), logits.size(1),
                            entropy.data_ptr<acc_t>(),         lse.data_ptr<acc_t>()};
    a.post = make_logit_map<acc_t>(1.0, 0.0, temperature).post;
    a.grad_entropy = grad_entropy.const_data_ptr<acc_t>();
    a.grad_entropy_stride = grad_entropy.stride(0);
    a.grad = grad.data_ptr<scalar_t>();
    const Variant v = variant_named<scalar_t>(variant, a.num_classes, kPassEntropy);
    run_entropy(a, false, v, EmulatorLauncher{});
    run_entropy(a, true, v, EmulatorLauncher{});
  });
  return {entropy, lse, grad};
}

void scale_rows(at::Tensor rows, const at::Tensor& scale) {
  check_scale_rows_args(rows, scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "emulated_scale_rows", [&] {
    using acc_t = acc_type<scalar_t>;
    // A grid of 3 blocks, so that the grid-stride loop comes round.
    run_scale_rows(rows.data_ptr<scalar_t>(), rows.size(0), rows.size(1), rows.stride(0), scale.const_data_ptr<acc_t>(),
                   scale.stride(0), 3, EmulatorLauncher{});
  });
}

}  // namespace fused_ce::cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  // The logit map after the variant, defaulting to the identity (softcap(logit_scale * x) /
  // temperature); with_argmax last (the .stats overloads' two more outputs).
  m.def("forward", &fused_ce::cuda::forward, py::arg("logits"), py::arg("target"), py::arg("weight"),
        py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("softcap"), py::arg("vocab_start"),
        py::arg("vocab_total"), py::arg("variant"), py::arg("logit_scale") = 1.0, py::arg("temperature") = 1.0,
        py::arg("with_argmax") = false);
  m.def("backward", &fused_ce::cuda::backward, py::arg("logits"), py::arg("target"), py::arg("weight"), py::arg("lse"),
        py::arg("p_coef"), py::arg("t_coef"), py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("softcap"),
        py::arg("vocab_start"), py::arg("vocab_total"), py::arg("variant"), py::arg("keep_where_one"),
        py::arg("grad_in"), py::arg("logit_scale") = 1.0, py::arg("temperature") = 1.0);
  m.def("fused", &fused_ce::cuda::fused, py::arg("logits"), py::arg("target"), py::arg("weight"), py::arg("row_scale"),
        py::arg("z_scale"), py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("softcap"),
        py::arg("vocab_start"), py::arg("vocab_total"), py::arg("variant"), py::arg("inplace"),
        py::arg("logit_scale") = 1.0, py::arg("temperature") = 1.0, py::arg("with_argmax") = false);
  m.def("scale_rows", &fused_ce::cuda::scale_rows);
  m.def("entropy", &fused_ce::cuda::entropy, py::arg("logits"), py::arg("grad_entropy"), py::arg("variant"),
        py::arg("temperature") = 1.0);
  m.def("set_single_read_smem", &fused_ce::cuda::set_single_read_smem);
  m.def("single_read_scratch_bytes", [] { return int64_t(fused_ce::cuda::kScratchBytes); });
  m.def("resolved_variant", &fused_ce::cuda::resolved_variant);
}
