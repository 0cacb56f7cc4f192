"""Bad arguments raise a Python exception of the right type whose message names the argument.

A user who passes a wrong target or option must learn which argument is wrong and
why, never get a crash, a silent wrong number, or an internal error. The raw ops
check their own arguments too, since opcheck and torch.compile call them directly.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fused_ce
from fused_ce.linear import linear_cross_entropy
from linear_problems import make_problem

forward_op = torch.ops.fused_ce.cross_entropy_forward.default
backward_op = torch.ops.fused_ce.cross_entropy_backward.default


def _logits(*shape, device="cpu", dtype=torch.float32):
    return torch.randn(shape, device=device, dtype=dtype)


# -- class-index targets out of range -------------------------------------------------------


@pytest.mark.parametrize(
    "shape, bad_value, kwargs",
    [
        ((4, 5), 5, {}),  # == C
        ((4, 5), 1000, {}),
        ((4, 5), -1, {}),  # negative but not ignore_index
        ((4, 5), -100, dict(ignore_index=3)),  # the default ignore_index is not special once another is set
        ((2, 5, 3), 7, {}),
        ((5,), 5, {}),  # unbatched input, 0-d target
        ((4, 1), 1, dict(label_smoothing=0.1)),
    ],
    ids=["C", "large", "negative", "default_ignore_index_not_ignored", "k_dim", "unbatched", "one_class"],
)
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("validation", [False, True], ids=["validation_off", "validation_on"])
def test_out_of_range_target_raises_index_error_on_cpu(shape, bad_value, kwargs, target_dtype, validation):
    # On the CPU the check is free and always on, whatever set_target_validation says.
    fused_ce.set_target_validation(validation)
    x = _logits(*shape)
    batch = shape[:1] + shape[2:] if len(shape) > 1 else ()
    target = torch.zeros(batch, dtype=torch.int64)
    target.view(-1)[-1] = bad_value
    with pytest.raises(IndexError, match=rf"target.*{bad_value}.*out of range"):
        fused_ce.cross_entropy(x, target.to(target_dtype), **kwargs)


def test_ignore_index_outside_the_class_range_is_accepted():
    # The counterpart: -100 (or any ignore_index) is not an out-of-range class.
    x = _logits(3, 4)
    loss = fused_ce.cross_entropy(x, torch.tensor([1, 17, 2]), ignore_index=17, reduction="none")
    assert loss[1].item() == 0 and bool((loss[[0, 2]] > 0).all())


# -- shapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "input_shape, target_shape",
    [
        ((4, 5), (3,)),
        ((4, 5), (5,)),
        ((4, 5), (4, 1)),
        ((4, 5), ()),
        ((2, 5, 3), (2,)),
        ((2, 5, 3), (2, 5)),
        ((2, 5, 3, 4), (2, 4, 3)),
        ((5,), (2,)),
    ],
    ids=str,
)
def test_index_target_of_wrong_shape(device, input_shape, target_shape):
    x = _logits(*input_shape, device=device)
    target = torch.zeros(target_shape, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match=r"target.*shape"):
        fused_ce.cross_entropy(x, target)


@pytest.mark.parametrize(
    "input_shape, target_shape",
    [((4, 5), (4, 6)), ((4, 5), (5, 4)), ((4, 5), (4,)), ((2, 5, 3), (2, 3, 5)), ((5,), (4,))],
    ids=str,
)
def test_probability_target_of_wrong_shape(device, input_shape, target_shape):
    # A floating target is read as class probabilities, which must match the input.
    x = _logits(*input_shape, device=device)
    target = torch.rand(target_shape, device=device)
    with pytest.raises(ValueError, match=r"target.*probabilities.*shape"):
        fused_ce.cross_entropy(x, target)


def test_scalar_input(device):
    with pytest.raises(ValueError, match=r"input.*class dimension"):
        fused_ce.cross_entropy(torch.tensor(1.5, device=device), torch.tensor(0, device=device))


@pytest.mark.parametrize("shape", [(4, 0), (0,), (2, 0, 3), (0, 0)], ids=str)
def test_empty_class_dimension_as_pytorch(shape):
    # No classes: a counted class index is out of range (IndexError, as PyTorch's "Target 0
    # is out of bounds"); with no rows, or every row ignored, the empty/zero/NaN result.
    x = torch.randn(shape)
    batch = shape[:1] + shape[2:] if len(shape) > 1 else ()
    # PyTorch's own kernel mangles the (2, 0, 3) layout ("size mismatch"), so there the
    # rule is checked alone: nothing counts.
    torch_handles = shape != (2, 0, 3)
    counted = torch.zeros(batch, dtype=torch.int64)
    if counted.numel():
        if torch_handles:
            with pytest.raises(IndexError):
                F.cross_entropy(x, counted)
        with pytest.raises(IndexError, match=r"target.*out of range \[0, 0\)"):
            fused_ce.cross_entropy(x, counted)
    ignored = torch.full(batch, -100, dtype=torch.int64)
    expected = {"none": torch.zeros(batch), "mean": torch.tensor(math.nan), "sum": torch.tensor(0.0)}
    for reduction in ("none", "mean", "sum"):
        got = fused_ce.cross_entropy(x, ignored, reduction=reduction)
        torch.testing.assert_close(got, expected[reduction], equal_nan=True)
        if torch_handles:
            torch.testing.assert_close(got, F.cross_entropy(x, ignored, reduction=reduction), equal_nan=True)


# -- dtypes and argument types --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64], ids=str)
def test_logits_that_are_not_floating_point(device, dtype):
    x = torch.randint(0, 2, (4, 5), device=device).to(dtype)
    with pytest.raises(TypeError, match=r"input.*floating point"):
        fused_ce.cross_entropy(x, torch.zeros(4, dtype=torch.int64, device=device))


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64], ids=str)
def test_target_of_unsupported_dtype(device, dtype):
    # bool is not a class index (True would silently mean class 1).
    target = torch.zeros(4, device=device).to(dtype)
    with pytest.raises(TypeError, match=r"target.*class indices.*integer dtype"):
        fused_ce.cross_entropy(_logits(4, 5, device=device), target)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_floating_target_shaped_like_class_indices(device, dtype):
    # Class indices stored as floats are not silently truncated: a floating target
    # must be a probability tensor of the input's shape.
    target = torch.tensor([0.0, 2.0, 1.0, 4.0], device=device, dtype=dtype)
    with pytest.raises(ValueError, match=r"target.*class probabilities.*shape"):
        fused_ce.cross_entropy(_logits(4, 5, device=device), target)


@pytest.mark.parametrize("which", ["input", "target"])
def test_arguments_that_are_not_tensors(which):
    args = {"input": _logits(2, 3), "target": torch.tensor([0, 1])}
    args[which] = args[which].tolist()
    with pytest.raises(TypeError, match=rf"{which} must be a Tensor"):
        fused_ce.cross_entropy(args["input"], args["target"])


@pytest.mark.parametrize("ignore_index", [1.0, "1", True, None], ids=repr)
def test_ignore_index_that_is_not_an_int(ignore_index):
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        fused_ce.cross_entropy(_logits(2, 3), torch.tensor([0, 1]), ignore_index=ignore_index)


# -- options --------------------------------------------------------------------------------


@pytest.mark.parametrize("label_smoothing", [-0.1, 1.0000001, 2.0, math.nan, math.inf, -math.inf], ids=repr)
@pytest.mark.parametrize("target_kind", ["index", "probs"])
def test_label_smoothing_outside_unit_interval(device, label_smoothing, target_kind):
    x = _logits(3, 4, device=device)
    target = torch.tensor([0, 1, 2], device=device) if target_kind == "index" else torch.rand(3, 4, device=device)
    with pytest.raises(ValueError, match=r"label_smoothing.*\[0, 1\]"):
        fused_ce.cross_entropy(x, target, label_smoothing=label_smoothing)


@pytest.mark.parametrize("reduction", ["avg", "MEAN", "", None, "elementwise_mean"], ids=repr)
def test_unknown_reduction(device, reduction):
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        fused_ce.cross_entropy(
            _logits(3, 4, device=device), torch.tensor([0, 1, 2], device=device), reduction=reduction
        )


def test_unknown_reduction_in_module():
    loss = fused_ce.CrossEntropyLoss(reduction="batchmean")
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        loss(_logits(3, 4), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("weight_shape", [(4,), (6,), (1, 5), (5, 1), ()], ids=str)
def test_weight_of_wrong_shape(device, weight_shape):
    weight = torch.rand(weight_shape, device=device)
    with pytest.raises(ValueError, match=r"weight must have shape \(5,\)"):
        fused_ce.cross_entropy(_logits(3, 5, device=device), torch.tensor([0, 1, 2], device=device), weight=weight)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool], ids=str)
def test_weight_that_is_not_floating_point(device, dtype):
    weight = torch.ones(5, device=device, dtype=dtype)
    with pytest.raises(TypeError, match=r"weight must be floating point"):
        fused_ce.cross_entropy(_logits(3, 5, device=device), torch.tensor([0, 1, 2], device=device), weight=weight)


def test_weight_that_is_not_a_tensor():
    with pytest.raises(TypeError, match=r"weight must be a Tensor or None"):
        fused_ce.cross_entropy(_logits(3, 5), torch.tensor([0, 1, 2]), weight=[1.0] * 5)


@pytest.mark.parametrize("target_kind", ["index", "probs"])
def test_weight_requiring_grad(device, target_kind):
    # F.cross_entropy has no gradient for weight either; say so instead of dropping it.
    weight = torch.rand(5, device=device).requires_grad_(True)
    x = _logits(3, 5, device=device)
    target = torch.tensor([0, 1, 2], device=device) if target_kind == "index" else torch.rand(3, 5, device=device)
    with pytest.raises(NotImplementedError, match=r"weight.*gradients.*not supported"):
        fused_ce.cross_entropy(x, target, weight=weight)


def test_weight_requiring_grad_is_fine_without_grad_mode():
    # Under no_grad nothing would be differentiated, so the weight is just a value.
    weight = torch.rand(5).requires_grad_(True)
    x, target = _logits(3, 5), torch.tensor([0, 1, 2])
    with torch.no_grad():
        loss = fused_ce.cross_entropy(x, target, weight=weight)
        expected = torch.nn.functional.cross_entropy(x, target, weight=weight.detach())
    torch.testing.assert_close(loss, expected)


# -- devices (CUDA) -------------------------------------------------------------------------


def test_target_on_another_device(cuda_device):
    with pytest.raises(ValueError, match=r"input and target must be on the same device"):
        fused_ce.cross_entropy(_logits(3, 4, device=cuda_device), torch.tensor([0, 1, 2]))


def test_weight_on_another_device(cuda_device):
    x = _logits(3, 4, device=cuda_device)
    target = torch.tensor([0, 1, 2], device=cuda_device)
    with pytest.raises(ValueError, match=r"weight must be on the input's device"):
        fused_ce.cross_entropy(x, target, weight=torch.ones(4))


@pytest.mark.parametrize("bad_value", [5, 1 << 40, -1, -101])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_of_range_target_gives_nan_row_on_cuda(cuda_device, dtype, bad_value):
    # Without validation the CUDA kernels never read out of bounds and mark the row
    # NaN (loss and gradient) instead of syncing to raise; the other rows are exact.
    fused_ce.set_target_validation(False)
    x = _logits(6, 5, device=cuda_device, dtype=dtype)
    target = torch.tensor([0, 4, bad_value, 2, -100, 1], device=cuda_device)
    xg = x.clone().requires_grad_(True)
    loss = fused_ce.cross_entropy(xg, target, reduction="none")
    (grad,) = torch.autograd.grad(loss, xg, torch.ones_like(loss))
    assert bool(loss[2].isnan()) and bool(grad[2].isnan().all())

    good = torch.tensor([0, 1, 3, 4, 5], device=cuda_device)
    xr = x[good].clone().requires_grad_(True)
    expected = torch.nn.functional.cross_entropy(xr.float(), target[good], reduction="none")
    (expected_grad,) = torch.autograd.grad(expected, xr, torch.ones_like(expected))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(loss[good].float(), expected, **tol)
    torch.testing.assert_close(grad[good].float(), expected_grad.float(), **tol)
    assert bool(fused_ce.cross_entropy(x, target).isnan()), "the mean includes the NaN row"


@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("bad_value", [5, -1])
def test_out_of_range_target_raises_on_cuda_with_validation(cuda_device, target_dtype, bad_value):
    fused_ce.set_target_validation(True)
    target = torch.tensor([0, bad_value, 2], device=cuda_device, dtype=target_dtype)
    with pytest.raises(IndexError, match=rf"target.*{bad_value}.*out of range"):
        fused_ce.cross_entropy(_logits(3, 5, device=cuda_device), target)
    # ... and valid targets still pass the check.
    fused_ce.cross_entropy(_logits(3, 5, device=cuda_device), target.clamp(min=0, max=4))


# -- the raw ops ----------------------------------------------------------------------------


def _raw_args(device, **changes):
    args = dict(
        logits=_logits(4, 5, device=device),
        target=torch.tensor([0, 1, -100, 4], device=device),
        weight=None,
        ignore_index=-100,
        label_smoothing=0.0,
        softcap=0.0,
    )
    args.update(changes)
    return args


RAW_FORWARD_CASES = {
    "3d_logits": (dict(logits=torch.randn(2, 4, 5)), ValueError, r"logits must be 2-D"),
    "integer_logits": (dict(logits=torch.ones(4, 5, dtype=torch.int64)), TypeError, r"logits must be floating point"),
    "class_stride": (dict(logits=torch.randn(5, 4).t()), ValueError, r"logits must have unit stride"),
    "no_classes": (dict(logits=torch.randn(4, 0)), ValueError, r"logits must have at least one class"),
    "int32_target": (dict(target=torch.tensor([0, 1, 2, 3], dtype=torch.int32)), TypeError, r"target must be int64"),
    "target_length": (dict(target=torch.tensor([0, 1, 2])), ValueError, r"target must have shape \[4\]"),
    "probs_shape": (dict(target=torch.rand(4, 6)), ValueError, r"probability target must have the logits' shape"),
    "probs_dtype": (
        dict(target=torch.rand(4, 5, dtype=torch.float64)),
        TypeError,
        r"probability target must have the logits' dtype",
    ),
    "weight_dtype": (dict(weight=torch.ones(5, dtype=torch.float64)), TypeError, r"weight must be"),
    "weight_shape": (dict(weight=torch.ones(6)), ValueError, r"weight must have shape \[5\]"),
    "label_smoothing": (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\]"),
    "negative_softcap": (dict(softcap=-1.0), ValueError, r"softcap must be finite and >= 0"),
    "nan_softcap": (dict(softcap=math.nan), ValueError, r"softcap must be finite and >= 0"),
    "inf_softcap": (dict(softcap=math.inf), ValueError, r"softcap must be finite and >= 0"),
    "target_out_of_range": (dict(target=torch.tensor([0, 5, 1, 2])), IndexError, r"target: class index 5 .*range"),
}


@pytest.mark.parametrize("case", list(RAW_FORWARD_CASES))
def test_raw_forward_op_checks_its_arguments(case):
    changes, error, message = RAW_FORWARD_CASES[case]
    args = _raw_args("cpu", **changes)
    with pytest.raises(error, match=message):
        forward_op(*args.values())


# The row vectors' dtype is the kernels' accumulation dtype (float32 for float32 logits).
RAW_BACKWARD_CASES = {
    "lse_dtype": ("lse", lambda t: t.double(), TypeError, r"lse must be (float32|Float)"),
    "lse_shape": ("lse", lambda t: t[:3], ValueError, r"lse must have shape \[4\]"),
    "p_coef_shape": ("p_coef", lambda t: t.reshape(2, 2), ValueError, r"p_coef must have shape \[4\]"),
    "t_coef_dtype": ("t_coef", lambda t: t.half(), TypeError, r"t_coef must be (float32|Float)"),
}


@pytest.mark.parametrize("case", list(RAW_BACKWARD_CASES))
def test_raw_backward_op_checks_its_arguments(case):
    name, change, error, message = RAW_BACKWARD_CASES[case]
    args = _raw_args("cpu")
    _, lse, mass = forward_op(*args.values())
    row_args = dict(lse=lse, p_coef=mass.clone(), t_coef=torch.ones_like(lse))
    row_args[name] = change(row_args[name])
    with pytest.raises(error, match=message):
        backward_op(
            args["logits"], args["target"], args["weight"], row_args["lse"], row_args["p_coef"], row_args["t_coef"],
            args["ignore_index"], args["label_smoothing"], args["softcap"],
        )


_VARIANT_RESULTS = """
import sys, torch, fused_ce
torch.manual_seed(0)
x = torch.randn(6, 20000, device="cuda").bfloat16()
target = torch.randint(0, 20000, (6,), device="cuda")
probs = torch.softmax(torch.randn(6, 20000, device="cuda"), -1).bfloat16()
# Forward alone, the fused loss + gradient, smoothing, probability targets, entropy.
xs = x.detach().requires_grad_(True)
loss = fused_ce.cross_entropy(xs, target, label_smoothing=0.1)
loss.backward()
h = x.detach().requires_grad_(True)
entropy = fused_ce.entropy(h)
entropy.sum().backward()
torch.save([t.cpu() for t in (fused_ce.cross_entropy(x, target, reduction="none"), loss, xs.grad,
            fused_ce.cross_entropy(x, probs, reduction="none"), entropy, h.grad)], sys.argv[1])
"""


def _variant_results(variant: str, path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FUSED_CE_CUDA_VARIANT"}
    if variant != "auto":
        env["FUSED_CE_CUDA_VARIANT"] = variant
    return subprocess.run(
        [sys.executable, "-c", _VARIANT_RESULTS, str(path)], env=env, capture_output=True, text=True, timeout=600
    )


def test_variant_override(cuda_device, tmp_path):
    # FUSED_CE_CUDA_VARIANT (a measuring knob, csrc/cuda/variants.h), read once per
    # process: every variant gives the same results up to the merge order; a name that is
    # no variant is refused at the first launch.
    runs = {}
    for variant in ("auto", "stream32", "stream256", "stream512", "stream1024", "single_read"):
        done = _variant_results(variant, tmp_path / f"{variant}.pt")
        assert done.returncode == 0, done.stderr
        runs[variant] = torch.load(tmp_path / f"{variant}.pt")
    for variant, got in runs.items():
        for g, want in zip(got, runs["auto"]):
            torch.testing.assert_close(g, want, msg=lambda m, v=variant: f"{v}: {m}")
    done = _variant_results("stream7", tmp_path / "bad.pt")
    assert done.returncode != 0
    assert "FUSED_CE_CUDA_VARIANT must be one of stream32, stream256, stream512, stream1024, single_read" in done.stderr


# -- the same refusals as PyTorch, with exceptions its callers already catch ---------------------
#
# Each case is run through PyTorch's function and fused_ce's. Where PyTorch raises, fused_ce
# must raise too, an instance of PyTorch's exception class (a NotImplementedError that
# PyTorch's kernels raise for a dtype they lack counts as the RuntimeError it derives from),
# so that `except RuntimeError` / `except ValueError` written for PyTorch still works.

_L = torch.long


def _expected_class(error: BaseException) -> type:
    return RuntimeError if type(error) is NotImplementedError else type(error)


_CROSS_ENTROPY_REFUSED = {
    "probs_with_ignore_index": lambda: ((torch.randn(3, 5), torch.rand(3, 5)), dict(ignore_index=3)),
    "label_smoothing_above_one": lambda: ((torch.randn(3, 5), torch.zeros(3, dtype=_L)), dict(label_smoothing=2.0)),
    "bad_reduction": lambda: ((torch.randn(3, 5), torch.zeros(3, dtype=_L)), dict(reduction="avg")),
    "reduction_none_object": lambda: ((torch.randn(3, 5), torch.zeros(3, dtype=_L)), dict(reduction=None)),
    "target_batch": lambda: ((torch.randn(3, 5), torch.zeros(4, dtype=_L)), {}),
    "probs_shape": lambda: ((torch.randn(3, 5), torch.rand(3, 4)), {}),
    "weight_shape": lambda: ((torch.randn(3, 5), torch.zeros(3, dtype=_L)), dict(weight=torch.ones(4))),
    "weight_2d": lambda: ((torch.randn(3, 5), torch.zeros(3, dtype=_L)), dict(weight=torch.ones(1, 5))),
    "weight_integer": lambda: ((torch.randn(3, 5), torch.zeros(3, dtype=_L)), dict(weight=torch.ones(5, dtype=_L))),
    "weight_requires_grad": lambda: (
        (torch.randn(3, 5), torch.zeros(3, dtype=_L)), dict(weight=torch.ones(5, requires_grad=True))),
    "integer_logits": lambda: ((torch.ones(3, 5, dtype=_L), torch.zeros(3, dtype=_L)), {}),
    "bool_target": lambda: ((torch.randn(3, 5), torch.zeros(3, dtype=torch.bool)), {}),
    "scalar_input": lambda: ((torch.tensor(1.0), torch.tensor(0)), {}),
    "unbatched_target_of_two": lambda: ((torch.randn(5), torch.tensor([1, 2])), {}),
    "target_out_of_range": lambda: ((torch.randn(3, 5), torch.tensor([0, 5, 1])), {}),
    "target_negative": lambda: ((torch.randn(3, 5), torch.tensor([0, -1, 1])), {}),
    "no_classes_counted_row": lambda: ((torch.randn(4, 0), torch.zeros(4, dtype=_L)), {}),
    "ignore_index_float": lambda: ((torch.randn(3, 5), torch.zeros(3, dtype=_L)), dict(ignore_index=1.5)),
    "target_list": lambda: ((torch.randn(3, 5), [0, 1, 2]), {}),
}


@pytest.mark.parametrize("case", list(_CROSS_ENTROPY_REFUSED))
def test_cross_entropy_refuses_what_pytorch_refuses(case):
    args, kwargs = _CROSS_ENTROPY_REFUSED[case]()
    with pytest.raises(Exception) as torch_error:
        F.cross_entropy(*args, **kwargs)
    with pytest.raises(_expected_class(torch_error.value)):
        fused_ce.cross_entropy(*args, **kwargs)
    with pytest.raises(_expected_class(torch_error.value)):  # the module: at its first call, as torch's
        fused_ce.CrossEntropyLoss(**kwargs)(*args)


_LINEAR_REFUSED = {
    "probs_with_ignore_index": lambda: (
        (torch.randn(3, 4), torch.randn(5, 4), torch.rand(3, 5)), dict(ignore_index=-100)),
    "label_smoothing_above_one": lambda: (
        (torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=_L)), dict(label_smoothing=2.0)),
    "bad_reduction": lambda: ((torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=_L)), dict(reduction="x")),
    "bias_shape": lambda: (
        (torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=_L)), dict(linear_bias=torch.zeros(4))),
    "in_features": lambda: ((torch.randn(3, 4), torch.randn(5, 3), torch.zeros(3, dtype=_L)), {}),
    "weight_1d": lambda: ((torch.randn(3, 4), torch.randn(4), torch.zeros(3, dtype=_L)), {}),
    "dtype_mismatch": lambda: ((torch.randn(3, 4), torch.randn(5, 4).double(), torch.zeros(3, dtype=_L)), {}),
    "no_classes_counted_row": lambda: ((torch.randn(3, 4), torch.randn(0, 4), torch.zeros(3, dtype=_L)), {}),
    "target_out_of_range": lambda: ((torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 5, 1])), {}),
}


@pytest.mark.parametrize("case", list(_LINEAR_REFUSED))
def test_linear_cross_entropy_refuses_what_pytorch_refuses(case):
    args, kwargs = _LINEAR_REFUSED[case]()
    with pytest.raises(Exception) as torch_error:
        F.linear_cross_entropy(*args, **kwargs)
    with pytest.raises(_expected_class(torch_error.value)):
        fused_ce.linear_cross_entropy(*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [dict(label_smoothing=2.0), dict(label_smoothing=-1.0), dict(weight=torch.ones(4)), dict(reduction="avg")],
    ids=["label_smoothing_high", "label_smoothing_low", "weight_shape", "reduction"],
)
def test_linear_module_refuses_at_the_moment_pytorch_does(kwargs):
    # torch.nn.LinearCrossEntropyLoss checks weight and label_smoothing at construction,
    # the rest at the first call.
    x, target = torch.randn(3, 4), torch.zeros(3, dtype=_L)
    try:
        torch_module = torch.nn.LinearCrossEntropyLoss(4, 5, **kwargs)
    except Exception as error:  # refused at construction
        with pytest.raises(_expected_class(error)):
            fused_ce.LinearCrossEntropyLoss(4, 5, **kwargs)
        return
    with pytest.raises(Exception) as torch_error:
        torch_module(x, target)
    ours = fused_ce.LinearCrossEntropyLoss(4, 5, **kwargs)  # accepted at construction, as torch's
    with pytest.raises(_expected_class(torch_error.value)):
        ours(x, target)


def test_error_classes_are_both_kinds():
    # Documented: code catching PyTorch's RuntimeError, or the ValueError/TypeError a
    # Python API raises, catches fused_ce's.
    assert issubclass(fused_ce.ArgumentError, ValueError) and issubclass(fused_ce.ArgumentError, RuntimeError)
    assert issubclass(fused_ce.ArgumentTypeError, TypeError) and issubclass(fused_ce.ArgumentTypeError, RuntimeError)


# -- option values; dtype conversions PyTorch does not do ------------------------------------


# (test_extras.py covers -1, nan, inf and "0.1" for both.)
@pytest.mark.parametrize("z_loss", [-1e-4, -math.inf, True, None], ids=repr)
def test_z_loss_invalid(z_loss):
    with pytest.raises(ValueError, match=r"z_loss must be a finite number >= 0"):
        fused_ce.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), z_loss=z_loss)


@pytest.mark.parametrize("softcap", [0, -math.inf, True, "30"], ids=repr)
def test_softcap_invalid(softcap):
    # None turns the soft-cap off; 0 is not a synonym (a cap of 0 is meaningless).
    with pytest.raises(ValueError, match=r"softcap must be None or a finite number > 0"):
        fused_ce.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), softcap=softcap)


@pytest.mark.parametrize("ignore_index", [2**63, -(2**63) - 1], ids=str)
def test_ignore_index_outside_int64(ignore_index):
    with pytest.raises(ValueError, match=r"ignore_index must fit in int64"):
        fused_ce.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), ignore_index=ignore_index)


def test_label_smoothing_that_is_not_a_number():
    with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 1\]"):
        fused_ce.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), label_smoothing="0.1")


@pytest.mark.parametrize("weight_dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_weight_of_another_floating_dtype_is_converted(weight_dtype):
    # PyTorch raises for a weight whose dtype differs from the logits'; fused_ce
    # converts it to its accumulation dtype, so the result is that of the converted weight.
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(7))
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    weight = (torch.rand(5, generator=torch.Generator().manual_seed(8)) + 0.5).to(weight_dtype)
    with pytest.raises(RuntimeError):
        F.cross_entropy(x, target, weight=weight)
    loss = fused_ce.cross_entropy(x, target, weight=weight)
    torch.testing.assert_close(loss, F.cross_entropy(x, target, weight=weight.float()), rtol=1e-5, atol=1e-6)


def test_probability_target_of_another_floating_dtype_is_converted():
    # The same for class probabilities: converted to the logits' dtype.
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(9))
    target = torch.randn(6, 5, generator=torch.Generator().manual_seed(10), dtype=torch.float64).softmax(1)
    loss = fused_ce.cross_entropy(x, target)
    torch.testing.assert_close(loss, F.cross_entropy(x, target.float()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target_dtype", [torch.int32, torch.int16, torch.uint8], ids=str)
def test_out_of_range_narrow_integer_targets_raise(target_dtype):
    # Narrow integer targets are widened before the range check, not wrapped.
    target = torch.tensor([0, 200, 1], dtype=target_dtype)
    with pytest.raises(IndexError, match=r"target.*out of range"):
        fused_ce.cross_entropy(torch.randn(3, 5), target)


# -- linear_cross_entropy ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_args, error, match",
    [
        (lambda x, w, t: (x.double(), w, t), TypeError, "linear_weight must have input's dtype"),
        (lambda x, w, t: (x, w[:, :-1], t), ValueError, "in_features"),
        (lambda x, w, t: (x, w.reshape(w.shape[0], 2, -1), t), NotImplementedError, "2-D"),
        (lambda x, w, t: (x, w, t[:-1]), ValueError, "batch shape"),
        (lambda x, w, t: (x, w, t.float()), ValueError, "class probabilities must have shape"),
        (lambda x, w, t: (x.long(), w, t), TypeError, "floating point"),
        (lambda x, w, t: (x[0, 0], w, t), ValueError, "scalar"),
    ],
    ids=["dtype", "in_features", "k_dim_weight", "target_shape", "probs_shape", "int_input", "scalar_input"],
)
def test_linear_bad_input(device, make_args, error, match):
    x, w, target, _ = make_problem("plain", (6,), 8, 10, torch.float32, device)
    with pytest.raises(error, match=match):
        linear_cross_entropy(*make_args(x, w, target))


def test_linear_bad_options(device):
    x, w, target, _ = make_problem("plain", (6,), 8, 10, torch.float32, device)
    with pytest.raises(ValueError, match="linear_bias must have shape"):
        linear_cross_entropy(x, w, target, linear_bias=torch.zeros(3, device=device))
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(x, w, target, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(x, w, target, label_smoothing=1.5)
    with pytest.raises(ValueError, match="weight must have shape"):
        linear_cross_entropy(x, w, target, weight=torch.ones(3, device=device))
    with pytest.raises(ValueError, match="z_loss"):
        linear_cross_entropy(x, w, target, z_loss=-1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(x, w, target, chunk_size=0)
    if device == "cpu":  # CUDA gives that row NaN instead (see fused_ce.set_target_validation)
        with pytest.raises(IndexError, match="out of range"):
            linear_cross_entropy(x, w, torch.full_like(target, 10))
