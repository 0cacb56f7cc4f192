"""Property-based tests: random problems of every kind against float64 formulas and PyTorch.

Each example draws a whole problem -- shape (V = 1, odd and large V, N = 0, unbatched,
K-dimensional), dtype, memory layout (sliced rows, strided rows, transposed, broadcast
rows, channels-last), target kind, every option of ``fused_ce.cross_entropy``, the
execution path (forward only, the fused training path, in place, the two-pass path
through ``return_lse`` or a learned probability target), the logit scale (1e-3 ... 1e4)
and the upstream gradient -- and checks the loss, the lse and the gradients:

* float32/float64 against ``fused_ce.reference`` (plus the z-loss term) in float64;
* float16/bfloat16 against the same float64 values, with an error no worse than twice
  PyTorch's own at that dtype (PyTorch composing the same formula from its ops);
* non-finite logits (NaN, +-inf, masked rows) against ``F.cross_entropy`` on the same
  inputs, NaN and inf positions included;
* ``fused_ce.linear.linear_cross_entropy`` (when that module exists) against
  ``F.linear`` followed by the float64 reference.

Budget: CI runs each test's fixed, derandomised budget (see ``_examples``); set
``FUSED_CE_HYPOTHESIS_EXAMPLES=N`` or ``--hypothesis-examples=N`` for N random examples
per test.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fused_ce
from fused_ce.reference import cross_entropy_reference, torch_cross_entropy
from utils import max_error

_BUDGET = os.environ.get("FUSED_CE_HYPOTHESIS_EXAMPLES", "").strip()


def _examples(ci_budget: int) -> settings:
    """CI: `ci_budget` examples, the same ones every run. With a budget set: that many, at random."""
    common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    if _BUDGET:
        return settings(max_examples=int(_BUDGET), derandomize=False, **common)
    return settings(max_examples=ci_budget, derandomize=True, database=None, **common)


# The device as a parameter, not conftest's fixture: hypothesis runs many examples per
# test call, and a function-scoped fixture would not be reset between them.
_HAS_CUDA = torch.cuda.is_available() and fused_ce.cuda_kernels_available()
DEVICES = pytest.mark.parametrize(
    "device",
    [
        pytest.param("cpu", id="cpu"),
        pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
            not _HAS_CUDA, reason="needs a CUDA GPU and a fused_ce build with its CUDA kernels")),
    ],
)

LOW_PRECISION = (torch.float16, torch.bfloat16)
SCALES = [1e-3, 1e-1, 1.0, 3.0, 30.0, 1e3, 1e4]
# Odd, power-of-two neighbours (the kernels' 2048-wide blocks and 8/16-wide vectors),
# and one large vocabulary.
SMALL_V = st.one_of(st.sampled_from([1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33]), st.integers(1, 300))
LARGE_V = st.sampled_from([2047, 2048, 2049, 4095, 4097, 6143, 32771])
MAX_ELEMENTS = 40_000  # per problem: keeps an example in the milliseconds


# -- problems ---------------------------------------------------------------------------------


@dataclass
class Problem:
    """One drawn problem; `materialize` makes its tensors, `_view` its logits' layout."""

    dtype: torch.dtype
    shape: tuple  # the logits' shape: (C), (N, C) or (N, C, d1, ...)
    layout: str
    scale: float
    target_kind: str  # "index" or "probs"
    target_dtype: torch.dtype
    ignore: str  # "default" (-100), "class" (a real class), "outside" (> C)
    ignored_fraction: float
    weight: str  # "none", "positive", "with_zeros"
    label_smoothing: float
    reduction: str
    z_loss: float
    softcap: float | None
    path: str  # "forward", "fused", "inplace", "lse", "target_grad"
    return_lse: bool
    upstream: str  # "ones", "random", "mixed" (some rows exactly 1)
    seed: int

    @property
    def class_dim(self) -> int:
        return 0 if len(self.shape) == 1 else 1

    @property
    def num_classes(self) -> int:
        return self.shape[self.class_dim]

    @property
    def batch_shape(self) -> tuple:
        return tuple(self.shape[: self.class_dim]) + tuple(self.shape[self.class_dim + 1 :])


def _layouts(shape) -> list[str]:
    if len(shape) == 1:
        return ["contiguous", "strided"]
    if len(shape) == 2:
        return ["contiguous", "wide_slice", "every_other_row", "transposed", "broadcast_row"]
    return ["contiguous", "channels_last"]


def _base_shape(shape, layout):
    """The shape of the leaf tensor from which `_view` makes logits of `shape`."""
    if layout == "strided":
        return (2 * shape[0],)
    if layout == "wide_slice":
        return (shape[0], shape[1] + 13)
    if layout == "every_other_row":
        return (2 * shape[0], shape[1])
    if layout == "transposed":
        return (shape[1], shape[0])
    if layout == "broadcast_row":
        return (1, shape[1])
    if layout == "channels_last":
        return (shape[0],) + tuple(shape[2:]) + (shape[1],)
    return tuple(shape)


def _view(base, shape, layout):
    if layout == "strided":
        return base[::2]
    if layout == "wide_slice":
        return base[:, 5 : 5 + shape[1]]
    if layout == "every_other_row":
        return base[::2]
    if layout == "transposed":
        return base.t()
    if layout == "broadcast_row":
        return base.expand(shape)
    if layout == "channels_last":
        return base.movedim(-1, 1)
    return base


@st.composite
def problems(draw, dtypes=(torch.float32, torch.float64), extras=True, paths=None):
    dtype = draw(st.sampled_from(dtypes))
    kind = draw(st.sampled_from(["unbatched", "rows", "rows", "rows", "k_dim"]))
    large = draw(st.booleans()) if kind == "rows" else False
    num_classes = draw(LARGE_V if large else SMALL_V)
    if kind == "unbatched":
        shape = (num_classes,)
    elif kind == "rows":
        n = draw(st.integers(0, max(0, min(40, MAX_ELEMENTS // num_classes))))
        shape = (n, num_classes)
    else:
        num_classes = min(num_classes, 64)
        extra = draw(st.lists(st.integers(0, 4), min_size=1, max_size=2))  # 0: an empty position dimension
        shape = (draw(st.integers(0, 3)), num_classes, *extra)
    layout = draw(st.sampled_from(_layouts(shape)))

    target_kind = draw(st.sampled_from(["index", "index", "probs"]))
    path_choices = paths or ["forward", "fused", "fused", "inplace", "lse"] + (
        ["target_grad"] if target_kind == "probs" else []
    )
    path = draw(st.sampled_from(path_choices))
    if path == "target_grad" and target_kind != "probs":
        path = "fused"
    if path == "inplace" and layout == "broadcast_row":
        layout = "contiguous"  # writing a gradient over rows that share memory raises (tested in test_reliability)
    return Problem(
        dtype=dtype,
        shape=shape,
        layout=layout,
        scale=draw(st.sampled_from(SCALES)),
        target_kind=target_kind,
        target_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
        ignore=draw(st.sampled_from(["default", "class", "outside"])),
        ignored_fraction=draw(st.sampled_from([0.0, 0.0, 0.3, 1.0])),
        weight=draw(st.sampled_from(["none", "none", "positive", "with_zeros"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.0, 0.1, 1.0]) | st.floats(1e-3, 1.0)),
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        z_loss=draw(st.sampled_from([0.0, 0.0, 1e-4, 0.5])) if extras else 0.0,
        softcap=draw(st.sampled_from([None, None, 1.0, 30.0])) if extras else None,
        path=path,
        return_lse=(path == "lse") or (path == "forward" and extras and draw(st.booleans())),
        upstream=draw(st.sampled_from(["ones", "random", "mixed"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def materialize(p: Problem):
    """Draws the tensors of a problem: (base, the leaf the logits are a view of; target; kwargs)."""
    g = torch.Generator().manual_seed(p.seed)
    finfo = torch.finfo(p.dtype)
    base64 = torch.randn(_base_shape(p.shape, p.layout), generator=g, dtype=torch.float64) * p.scale
    base = base64.clamp(-finfo.max / 4, finfo.max / 4).to(p.dtype)
    c = p.num_classes
    kwargs = dict(reduction=p.reduction, label_smoothing=p.label_smoothing)
    if p.target_kind == "probs":
        target = (2 * torch.randn(p.shape, generator=g, dtype=torch.float64)).softmax(p.class_dim).to(p.dtype)
    else:
        target = torch.randint(0, c, p.batch_shape, generator=g)
        ignore_index = {"default": -100, "class": int(torch.randint(0, c, (), generator=g)), "outside": c + 5}[p.ignore]
        if p.ignore != "default":
            kwargs["ignore_index"] = ignore_index
        ignored = torch.rand(p.batch_shape, generator=g) < p.ignored_fraction
        target = torch.where(ignored, ignore_index, target).to(p.target_dtype)
    if p.weight != "none":
        w = torch.rand(c, generator=g, dtype=torch.float64) + 0.25
        if p.weight == "with_zeros":
            w = w * (torch.rand(c, generator=g) < 0.7)
        kwargs["weight"] = w.to(p.dtype)
    if p.z_loss:
        kwargs["z_loss"] = p.z_loss
    if p.softcap is not None:
        kwargs["softcap"] = p.softcap
    return base, target, kwargs


def upstream_for(p: Problem, shape, g: torch.Generator) -> torch.Tensor:
    """The upstream gradient of the loss, rounded to the loss's dtype (float64 values)."""
    if p.upstream == "ones":
        return torch.ones(shape, dtype=torch.float64)
    u = torch.randn(shape, generator=g, dtype=torch.float64)
    if p.upstream == "mixed":
        u = torch.where(torch.rand(shape, generator=g) < 0.5, torch.ones_like(u), u)
    return u.to(p.dtype).to(torch.float64)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- float64 expectations -----------------------------------------------------------------


def reference_with_extras(x64, target, kwargs):
    """fused_ce's loss and lse in float64 (cross_entropy_reference, z-loss and soft-cap included)."""
    return cross_entropy_reference(x64, target, **kwargs, return_lse=True)


def _on(t, device):
    return t.to(device) if isinstance(t, torch.Tensor) else t


def run(fn, p: Problem, base, target, kwargs, upstream_gen, *, reference: bool, device: str = "cpu"):
    """Loss, lse (or None) and gradients wrt base (and the target) of one problem under fn.

    fn runs on `device`; the reference (fn unused) on the CPU in float64. Results come
    back on the CPU.
    """
    if not reference:
        base, target = _on(base, device), _on(target, device)
        kwargs = {k: _on(v, device) for k, v in kwargs.items()}
    x_base = base.detach().to(torch.float64) if reference else base.detach()
    wants_grad = p.path != "forward"
    x_base = x_base.clone().requires_grad_(wants_grad)
    t = target
    if p.path == "target_grad":
        t = (target.to(torch.float64) if reference else target).detach().clone().requires_grad_(True)
    kw = dict(kwargs)
    if reference:
        kw = {k: (v.to(torch.float64) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    with torch.set_grad_enabled(wants_grad):
        x = _view(x_base * 1 if (p.path == "inplace" and not reference) else x_base, p.shape, p.layout)
        if reference:
            loss, lse = reference_with_extras(x, t, kw)
            lse = lse if p.return_lse else None
        else:
            if p.path == "inplace":
                kw["inplace_backward"] = True
            out = fn(x, t, return_lse=p.return_lse, **kw)
            loss, lse = out if p.return_lse else (out, None)
    if not wants_grad:
        return _on(loss, "cpu"), _on(lse, "cpu"), None, None
    g = torch.Generator().manual_seed(upstream_gen)
    outputs, grads_out = [loss], [upstream_for(p, loss.shape, g).to(loss.dtype).to(loss.device)]
    if lse is not None:
        u_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(accumulate_dtype(p.dtype))
        outputs.append(lse)
        grads_out.append(u_lse.to(lse.dtype).to(lse.device))
    inputs = [x_base] + ([t] if p.path == "target_grad" else [])
    grads = torch.autograd.grad(outputs, inputs, grads_out, allow_unused=True)
    grad_t = grads[1] if len(grads) > 1 else None
    return (_on(loss.detach(), "cpu"), None if lse is None else _on(lse.detach(), "cpu"), _on(grads[0], "cpu"),
            _on(grad_t, "cpu"))


def _tolerance(expected: torch.Tensor, dtype: torch.dtype, logit_magnitude: float = 0.0) -> dict:
    """float64: summation order only. float32: the kernels' 20-ulp exp and float32 sums over a row,
    plus the rounding of lse itself: exp(z - lse) then carries a relative error of about
    eps * |lse|, which at logits of 1e4 is 1e-3 (PyTorch's float32 kernels share it).
    Absolute errors scale with the largest value (cancellation at the target entry)."""
    finite = expected[expected.isfinite()]
    magnitude = float(finite.abs().max()) if finite.numel() else 0.0
    if dtype == torch.float64:
        eps = torch.finfo(torch.float64).eps
        return dict(rtol=1e-9 + 4 * eps * logit_magnitude, atol=1e-12 * (1 + magnitude))
    eps = torch.finfo(torch.float32).eps
    return dict(rtol=2e-5 + 4 * eps * logit_magnitude, atol=2e-6 * (1 + magnitude))


def logit_magnitude(p: Problem, base: torch.Tensor) -> float:
    """The largest |z| the kernels see (after the soft-cap), which bounds |lse - z|."""
    if base.numel() == 0:
        return 0.0
    m = float(base.abs().max())
    return min(m, p.softcap) if p.softcap is not None else m


def assert_close64(actual, expected, what, logit_mag=0.0):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(
        actual.to(torch.float64), expected, equal_nan=True, **_tolerance(expected, actual.dtype, logit_mag),
        msg=lambda m: f"{what}: {m}",
    )


# -- float32 / float64 against the reference ------------------------------------------------


@DEVICES
@_examples(ci_budget=250)
@given(p=problems())
def test_matches_float64_reference(device, p: Problem):
    base, target, kwargs = materialize(p)
    before = base.clone()
    loss, lse, grad, grad_t = run(
        fused_ce.cross_entropy, p, base, target, kwargs, p.seed + 1, reference=False, device=device
    )
    e_loss, e_lse, e_grad, e_grad_t = run(None, p, base, target, kwargs, p.seed + 1, reference=True)

    assert torch.equal(base, before), "the leaf logits were modified"
    mag = logit_magnitude(p, base)
    assert loss.dtype == p.dtype
    assert_close64(loss, e_loss, "loss", mag)
    if p.return_lse:
        assert lse.dtype == accumulate_dtype(p.dtype)
        assert_close64(lse, e_lse, "lse", mag)
    if grad is not None:
        assert grad.dtype == p.dtype
        assert_close64(grad, e_grad, "gradient", mag)
    if grad_t is not None:
        assert_close64(grad_t, e_grad_t, "target gradient", mag)


@DEVICES
@_examples(ci_budget=40)
@given(p=problems(paths=["fused"]))
def test_paths_agree(device, p: Problem):
    # The same problem on every execution path: forward values and gradients agree
    # with each other (each is checked against float64 above; this catches a path
    # that is wrong in a way the reference tolerance would hide at extreme scales).
    base, target, kwargs = materialize(p)
    results = {}
    for path in ("forward", "fused", "inplace", "lse"):
        q = replace(p, path=path, return_lse=path == "lse")
        if path == "inplace" and q.layout == "broadcast_row":
            continue
        results[path] = run(fused_ce.cross_entropy, q, base, target, kwargs, p.seed + 1, reference=False, device=device)
    mag = logit_magnitude(p, base)
    tol = _tolerance(results["forward"][0].to(torch.float64), p.dtype, mag)
    for path, (loss, _lse, _grad, _gt) in results.items():
        torch.testing.assert_close(loss, results["forward"][0], equal_nan=True, **tol,
                                   msg=lambda m, path=path: f"{path}: {m}")
    grads = {k: v[2] for k, v in results.items() if v[2] is not None}
    # The lse path's upstream also drives the lse, so it is compared to the reference only.
    grads.pop("lse", None)
    if "inplace" in grads:
        if p.upstream == "ones":
            # Both hand on the buffer the same forward kernel wrote: the same bits.
            assert torch.equal(grads["inplace"], grads["fused"]), "in-place and fused gradients differ"
        g_tol = _tolerance(grads["fused"].to(torch.float64), p.dtype, mag)
        torch.testing.assert_close(grads["inplace"], grads["fused"], equal_nan=True, **g_tol)


# -- float16 / bfloat16: no worse than PyTorch at that dtype --------------------------------


def torch_at_dtype(x, target, kwargs):
    """The loss a PyTorch user writes for fused_ce's options, computed at x's dtype."""
    return torch_cross_entropy(x, target, **kwargs)



def assert_no_worse_than_torch(actual, torch_value, expected, dtype, what, allowance=2.0, extra_floor=0.0):
    # Where the float64 value is representable at this dtype, fused_ce must be finite,
    # whatever PyTorch gives (it overflows in places: see test_reliability.py).
    representable = expected.isfinite() & (expected.abs() < torch.finfo(dtype).max)
    bad = representable & ~actual.to(torch.float64).isfinite()
    assert not bool(bad.any()), (
        f"{what}: non-finite where the float64 value {expected[bad][:3].tolist()} is representable"
    )
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN where the float64 value is not, or vice versa"
    finite = expected.isfinite() & actual.to(torch.float64).isfinite()
    scale = float(expected[finite].abs().max()) if bool(finite.any()) else 0.0
    error = max_error(actual[finite], expected[finite]) if bool(finite.any()) else 0.0
    torch_finite = finite & torch_value.to(torch.float64).isfinite()
    torch_error = max_error(torch_value[torch_finite], expected[torch_finite]) if bool(torch_finite.any()) else 0.0
    if not bool(torch_finite.all()):
        # PyTorch failed somewhere: hold fused_ce to its own dtype's rounding instead.
        torch_error = max(torch_error, torch.finfo(dtype).eps * scale)
    # + the spacing of the dtype's subnormals: below its smallest normal number an
    # error of one unit is not a relative error of 2**-11 any more.
    floor = 1e-6 * scale + 1e-8 + torch.finfo(dtype).tiny * torch.finfo(dtype).eps + extra_floor
    assert error <= allowance * torch_error + floor, (
        f"{what}: max error {error:.3g} against float64, PyTorch's own at {dtype} is {torch_error:.3g}"
    )


@DEVICES
@_examples(ci_budget=100)
@given(p=problems(dtypes=LOW_PRECISION, paths=["forward", "fused", "inplace"]))
def test_low_precision_no_worse_than_torch(device, p: Problem):
    base, target, kwargs = materialize(p)
    p = replace(p, return_lse=False)
    p_torch = replace(p, path="forward" if p.path == "forward" else "fused")
    loss, _, grad, _ = run(fused_ce.cross_entropy, p, base, target, kwargs, p.seed + 1, reference=False, device=device)
    e_loss, _, e_grad, _ = run(None, p_torch, base, target, kwargs, p.seed + 1, reference=True)
    t_loss, _, t_grad, _ = run(
        lambda x, t, return_lse, **kw: torch_at_dtype(x, t, kw), p_torch, base, target, kwargs, p.seed + 1,
        reference=False, device=device,
    )
    assert loss.dtype == p.dtype
    assert_no_worse_than_torch(loss, t_loss, e_loss, p.dtype, "loss")
    if grad is not None:
        assert grad.dtype == p.dtype
        allowance = 2.0
        if p.path == "inplace" and p.upstream != "ones":
            # Documented: in place, a row whose upstream gradient u is not exactly 1 is
            # scaled after its gradient g was stored at this dtype, so it is rounded
            # twice: |error| <= |u| ulp(g)/2 + ulp(u g)/2, up to 1 + |u| PyTorch's.
            u = upstream_for(p, loss.shape, torch.Generator().manual_seed(p.seed + 1))
            allowance = 2.0 * (1.0 + float(u.abs().max()) if u.numel() else 1.0)
        floor = _float32_floor(p, target, kwargs)
        assert_no_worse_than_torch(grad, t_grad, e_grad, p.dtype, "gradient", allowance, floor)


def _float32_floor(p: Problem, target, kwargs) -> float:
    """What float32 arithmetic may be off by in a gradient entry, in absolute terms.

    The kernels form grad_c = p_coef * softmax_c - t_coef * T_c in float32, with
    p_coef = t_coef * mass + 2 * z_scale * lse. On a confident row (softmax_y ~ T_y)
    the two terms cancel, and the z-loss part (2 z_scale lse softmax_y, tiny when
    z_loss * lse is) is left with an absolute error of about eps32 * t_coef * T_y;
    PyTorch's composition adds it separately. That is float32's accuracy, not a bug:
    allow a few eps32 of the largest t_coef * T_y.
    """
    w = kwargs.get("weight")
    w_max = float(w.abs().max()) if w is not None and w.numel() else 1.0
    u = upstream_for(p, () if p.reduction != "none" else p.batch_shape, torch.Generator().manual_seed(p.seed + 1))
    u_max = float(u.abs().max()) if u.numel() else 0.0
    row_scale = 1.0
    if p.reduction == "mean":
        if target.is_floating_point():
            denominator = float(max(1, target.numel() // p.num_classes))
        else:
            valid = target.long() != kwargs.get("ignore_index", -100)
            safe = target.long().clamp(0, p.num_classes - 1)
            weights = w.double()[safe] if w is not None else torch.ones(target.shape)
            denominator = float((weights.double() * valid).sum())
        row_scale = 1.0 / denominator if denominator > 0 else 0.0
    return 4 * torch.finfo(torch.float32).eps * u_max * w_max * row_scale


# -- non-finite logits: the same NaN/inf as PyTorch -------------------------------------------

ROW_KINDS = ["normal", "nan", "pos_inf", "neg_inf", "masked", "all_neg_inf", "nan_at_target", "neg_inf_at_target"]


@st.composite
def non_finite_problems(draw, paths=("forward", "fused", "inplace")):
    p = draw(problems(extras=False, paths=list(paths)))
    assume(p.layout != "broadcast_row" and len(p.shape) == 2 and p.shape[0] > 0)
    kinds = draw(st.lists(st.sampled_from(ROW_KINDS), min_size=p.shape[0], max_size=p.shape[0]))
    if p.label_smoothing == 1.0:
        # A documented difference: with label_smoothing = 1 the one-hot part has weight 0,
        # and a -inf logit at the target gives fused_ce the limit value +inf (T_y = w_y / C
        # > 0 there) where PyTorch computes 0 * inf = NaN. test_reliability.py pins it.
        p = replace(p, label_smoothing=0.5)
    if p.weight == "with_zeros":
        # The same documented difference: a class weighted 0 adds exactly 0 (0 log 0 = 0,
        # as xlogy), also on a -inf logit, where PyTorch computes 0 * inf = NaN.
        # test_reliability.py pins it.
        p = replace(p, weight="positive")
    return replace(p, return_lse=False), kinds


def poison_(x: torch.Tensor, target: torch.Tensor, kinds) -> None:
    """Writes NaN/inf into the rows of x (a view of the leaf) as `kinds` says."""
    c = x.shape[1]
    for i, kind in enumerate(kinds):
        y = int(target[i]) if not target.is_floating_point() and 0 <= int(target[i]) < c else 0
        other = (y + 1 + i) % c
        if kind == "nan":
            x[i, other] = math.nan
        elif kind == "pos_inf":
            x[i, other] = math.inf
        elif kind == "neg_inf":
            x[i, other] = -math.inf
        elif kind == "masked":
            x[i, 1::3] = -math.inf
        elif kind == "all_neg_inf":
            x[i] = -math.inf
        elif kind == "nan_at_target":
            x[i, y] = math.nan
        elif kind == "neg_inf_at_target":
            x[i, y] = -math.inf


def poisoned(p: Problem, kinds):
    base, target, kwargs = materialize(p)
    poison_(_view(base, p.shape, p.layout), target, kinds)
    return base, target, kwargs


def assert_same_values(actual, expected, dtype, what, logit_mag=0.0):
    """Same NaN and +-inf positions as PyTorch, and close values elsewhere."""
    assert actual.shape == expected.shape
    assert torch.equal(actual.isnan(), expected.isnan()), (
        f"{what}: NaN at {actual.isnan().nonzero().tolist()[:8]}, "
        f"PyTorch's at {expected.isnan().nonzero().tolist()[:8]}"
    )
    assert torch.equal(actual == math.inf, expected == math.inf), f"{what}: +inf positions differ from PyTorch's"
    assert torch.equal(actual == -math.inf, expected == -math.inf), f"{what}: -inf positions differ from PyTorch's"
    # Both sides are computed at `dtype`: allow each its float32/float64 error.
    tol = _tolerance(expected.to(torch.float64), dtype, logit_mag)
    tol = dict(rtol=2 * tol["rtol"], atol=2 * tol["atol"])
    torch.testing.assert_close(actual, expected, equal_nan=True, **tol, msg=lambda m: f"{what}: {m}")


def finite_magnitude(x: torch.Tensor) -> float:
    finite = x[x.isfinite()]
    return float(finite.abs().max()) if finite.numel() else 0.0


def _torch_fn(x, t, return_lse=False, **kwargs):
    return F.cross_entropy(x, t if t.is_floating_point() else t.long(), **kwargs)


@DEVICES
@_examples(ci_budget=120)
@given(pk=non_finite_problems())
def test_non_finite_logits_match_torch(device, pk):
    p, kinds = pk
    base, target, kwargs = poisoned(p, kinds)
    loss, _, grad, _ = run(fused_ce.cross_entropy, p, base, target, kwargs, p.seed + 1, reference=False, device=device)
    p_torch = replace(p, path="forward" if p.path == "forward" else "fused")
    t_loss, _, t_grad, _ = run(_torch_fn, p_torch, base, target, kwargs, p.seed + 1, reference=False, device=device)
    mag = finite_magnitude(base)
    assert_same_values(loss, t_loss, p.dtype, f"loss ({p.path} path)", mag)
    if grad is not None:
        assert_same_values(grad, t_grad, p.dtype, f"gradient ({p.path} path)", mag)


@DEVICES
@_examples(ci_budget=60)
@given(pk=non_finite_problems(paths=("lse",)))
def test_non_finite_logits_on_the_return_lse_path(device, pk):
    # return_lse=True takes the two-pass path. With no upstream gradient on the lse,
    # the loss and its gradient must be F.cross_entropy's, NaN positions included.
    p, kinds = pk
    base, target, kwargs = poisoned(p, kinds)
    upstream = upstream_for(p, p.shape[:1] if p.reduction == "none" else (), torch.Generator().manual_seed(p.seed))
    kwargs = {k: _on(v, device) for k, v in kwargs.items()}
    results = []
    for fn in (fused_ce.cross_entropy, F.cross_entropy):
        leaf = base.detach().clone().to(device).requires_grad_(True)
        extra = {"return_lse": True} if fn is fused_ce.cross_entropy else {}
        t = target if fn is fused_ce.cross_entropy or target.is_floating_point() else target.long()
        out = fn(_view(leaf, p.shape, p.layout), t.to(device), **kwargs, **extra)
        loss = out[0] if isinstance(out, tuple) else out
        (grad,) = torch.autograd.grad(loss, leaf, upstream.to(loss.dtype).to(device))
        results.append((loss.detach().cpu(), grad.cpu()))
    (loss, grad), (t_loss, t_grad) = results
    mag = finite_magnitude(base)
    assert_same_values(loss, t_loss, p.dtype, "loss", mag)
    assert_same_values(grad, t_grad, p.dtype, "gradient", mag)


# -- fused linear + cross-entropy ---------------------------------------------------------------


@st.composite
def linear_problems(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return dict(
        dtype=dtype,
        batch=draw(st.sampled_from([(), (0,), (1,), (5,), (24,), (2, 7)])),
        hidden=draw(st.sampled_from([1, 3, 16, 33])),
        vocab=draw(st.one_of(st.integers(1, 300), st.sampled_from([2047, 2049, 5000]))),
        bias=draw(st.booleans()),
        target_kind=draw(st.sampled_from(["index", "index", "probs"])),
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1, 1.0])),
        ignored_fraction=draw(st.sampled_from([0.0, 0.3, 1.0])),
        weighted=draw(st.booleans()),
        z_loss=draw(st.sampled_from([0.0, 1e-3])),
        softcap=draw(st.sampled_from([None, 20.0])),
        chunk_size=draw(st.sampled_from([None, 1, 3, 8])),
        wants=draw(st.sampled_from(["all", "input", "weight", "none"])),  # which operands require grad
        scale=draw(st.sampled_from([1e-2, 1.0, 10.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@DEVICES
@_examples(ci_budget=40)
@given(case=linear_problems())
def test_linear_cross_entropy_matches_reference(device, case):
    # fused_ce.linear.linear_cross_entropy(input, W, target, linear_bias=b, ...) against
    # F.linear in float64 followed by the float64 formulas: loss and the gradients of
    # every operand that requires grad, over batch shapes, chunk sizes and options.
    linear = pytest.importorskip("fused_ce.linear", reason="fused_ce.linear not available")
    g = torch.Generator().manual_seed(case["seed"])
    dtype, batch, h, v = case["dtype"], case["batch"], case["hidden"], case["vocab"]
    hidden = (torch.randn(*batch, h, generator=g, dtype=torch.float64) * case["scale"]).to(dtype)
    lm_weight = (torch.randn(v, h, generator=g, dtype=torch.float64) / math.sqrt(h)).to(dtype)
    lm_bias = torch.randn(v, generator=g, dtype=torch.float64).to(dtype) if case["bias"] else None
    if case["target_kind"] == "probs":
        target = (2 * torch.randn(*batch, v, generator=g, dtype=torch.float64)).softmax(-1).to(dtype)
    else:
        target = torch.randint(0, v, batch, generator=g)
        target = torch.where(torch.rand(batch, generator=g) < case["ignored_fraction"], -100, target)
    kwargs = dict(reduction=case["reduction"], label_smoothing=case["label_smoothing"], z_loss=case["z_loss"],
                  softcap=case["softcap"])
    if case["weighted"]:
        kwargs["weight"] = (torch.rand(v, generator=g, dtype=torch.float64) + 0.25).to(dtype)
    loss_shape = batch if case["reduction"] == "none" else ()
    upstream = torch.randn(loss_shape, generator=g, dtype=torch.float64).to(dtype).to(torch.float64)

    wants = case["wants"]
    operands = [hidden, lm_weight] + ([lm_bias] if lm_bias is not None else [])
    grads_on = [wants in ("all", "input"), wants in ("all", "weight"), wants == "all"][: len(operands)]

    leaves = [t.detach().clone().to(device).requires_grad_(on) for t, on in zip(operands, grads_on)]
    kw = {k: _on(t, device) for k, t in kwargs.items()}
    loss = linear.linear_cross_entropy(
        leaves[0], leaves[1], target.to(device), linear_bias=leaves[2] if len(leaves) > 2 else None,
        chunk_size=case["chunk_size"], **kw,
    )
    leaves64 = [t.detach().to(torch.float64).clone().requires_grad_(on) for t, on in zip(operands, grads_on)]
    logits64 = F.linear(leaves64[0], leaves64[1], leaves64[2] if len(leaves64) > 2 else None)
    kw64 = {k: (t.to(torch.float64) if isinstance(t, torch.Tensor) else t) for k, t in kwargs.items()}
    # The reference takes (N, C, ...) layouts: the classes of (*batch, V) go to dim 1.
    logits64 = logits64.movedim(-1, 1) if logits64.dim() > 2 else logits64
    t64 = target.to(torch.float64) if target.is_floating_point() else target
    t64 = t64.movedim(-1, 1) if t64.is_floating_point() and t64.dim() > 2 else t64
    expected = reference_with_extras(logits64, t64, kw64)[0]

    assert loss.dtype == dtype and loss.shape == expected.shape
    assert_close64(loss.detach().cpu(), expected.detach(), "loss")
    if not any(grads_on):
        return
    grads = torch.autograd.grad(loss, [t for t in leaves if t.requires_grad], upstream.to(dtype).to(device))
    expected_grads = torch.autograd.grad(expected, [t for t in leaves64 if t.requires_grad], upstream)
    names = [n for n, on in zip(["input", "weight", "bias"], grads_on) if on]
    for name, got, want in zip(names, grads, expected_grads):
        # Sums over the vocabulary (input) or over the batch (weight, bias) of products:
        # float32's error grows with their length and the values' size.
        tol = _tolerance(want, dtype, case["scale"])
        if dtype == torch.float32:
            tol = dict(rtol=1e-4, atol=1e-5 * (1 + (float(want.abs().max()) if want.numel() else 0.0)))
        torch.testing.assert_close(got.cpu().to(torch.float64), want, equal_nan=True, **tol,
                                   msg=lambda m, name=name: f"{name} gradient: {m}")
