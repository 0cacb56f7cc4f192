"""The registered ops and their integration with autograd and torch.compile.

* gradcheck of the public function in float64;
* torch.library.opcheck of both raw ops (schema, fake kernels, autograd registration,
  AOT dispatch with dynamic shapes);
* torch.compile(fullgraph=True) of the public function against eager;
* the raw ops' numbers against their float64 formulas, soft-capping included:

      z = softcap * tanh(x / softcap)   (softcap > 0; z = x when it is 0)
      T_c = w_c * ((1 - ls) * q_c + ls / V),  T = 0 for ignored rows
      forward:  loss = sum_c T_c (lse - z_c),  lse = logsumexp(z),  mass = sum_c T_c
      backward: grad = (p_coef * softmax(z) - t_coef * T) * dz/dx
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_ce
from fused_ce.reference import cross_entropy_reference
from utils import dtype_id

forward_op = torch.ops.fused_ce.cross_entropy_forward.default
backward_op = torch.ops.fused_ce.cross_entropy_backward.default

IGNORE = -100




# -- float64 formulas of the raw ops -------------------------------------------------------


def soft_capped(x64: torch.Tensor, softcap: float) -> torch.Tensor:
    return softcap * torch.tanh(x64 / softcap) if softcap > 0 else x64


def target_distribution(target, num_classes, weight, ignore_index, label_smoothing, device):
    """T [N, V] in float64 (zero rows where the class index is ignore_index)."""
    w = torch.ones(num_classes, dtype=torch.float64, device=device) if weight is None else weight.double()
    if target.is_floating_point():
        q = target.double()
        valid = torch.ones(target.shape[0], dtype=torch.bool, device=device)
    else:
        valid = target != ignore_index
        q = F.one_hot(torch.where(valid, target, 0), num_classes).double()
    return w * ((1 - label_smoothing) * q + label_smoothing / num_classes) * valid.unsqueeze(1)


def raw_problem(kind, n, num_classes, dtype, device, weighted):
    """Logits [n, V], a target of `kind` ("index" with ignored rows, or "probs"), and a weight or None."""
    logits = (4 * torch.randn(n, num_classes, device=device)).to(dtype)
    if kind == "index":
        target = torch.randint(0, num_classes, (n,), device=device)
        target[1::4] = IGNORE
    else:
        target = torch.randn(n, num_classes, device=device).softmax(1).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weight = (torch.rand(num_classes, device=device) + 0.5).to(acc) if weighted else None
    return logits, target, weight


# Row statistics are float32 for float32/bf16 logits; float64 logits are held to float64 accuracy.
RAW_TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1e-5, atol=1e-6),  # the logits are exact in float32, the math is fp32
    torch.float64: dict(rtol=1e-10, atol=1e-12),
}


@pytest.mark.parametrize("softcap", [0.0, 15.0])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True], ids=["no_weight", "weight"])
@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("num_classes", [1, 7, 3000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
def test_forward_op_matches_formulas(device, dtype, num_classes, kind, weighted, label_smoothing, softcap):
    logits, target, weight = raw_problem(kind, 9, num_classes, dtype, device, weighted)
    loss, lse, mass = forward_op(logits, target, weight, IGNORE, label_smoothing, softcap)

    z = soft_capped(logits.double(), softcap)
    t = target_distribution(target, num_classes, weight, IGNORE, label_smoothing, device)
    expected_lse = torch.logsumexp(z, dim=1)
    expected_mass = t.sum(1)
    expected_loss = (t * (expected_lse.unsqueeze(1) - z)).sum(1)
    # The same number by the independent route of the reference (log_softmax form).
    reference = cross_entropy_reference(
        logits, target, weight, IGNORE, "none", label_smoothing, softcap=softcap if softcap > 0 else None
    )
    torch.testing.assert_close(expected_loss, reference, rtol=1e-12, atol=1e-12)

    if dtype != torch.float64:
        assert loss.dtype == lse.dtype == mass.dtype == torch.float32
    tol = RAW_TOLERANCES[dtype]
    torch.testing.assert_close(loss.double(), expected_loss, **tol)
    torch.testing.assert_close(lse.double(), expected_lse, **tol)
    torch.testing.assert_close(mass.double(), expected_mass, **tol)
    if kind == "index":
        ignored = target == IGNORE
        assert bool((loss[ignored] == 0).all()) and bool((mass[ignored] == 0).all())


@pytest.mark.parametrize("softcap", [0.0, 15.0])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True], ids=["no_weight", "weight"])
@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("num_classes", [1, 7, 3000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
def test_backward_op_matches_formula(device, dtype, num_classes, kind, weighted, label_smoothing, softcap):
    n = 9
    logits, target, weight = raw_problem(kind, n, num_classes, dtype, device, weighted)
    _, lse, _ = forward_op(logits, target, weight, IGNORE, label_smoothing, softcap)
    p_coef = torch.randn(n, device=device, dtype=lse.dtype)
    t_coef = torch.randn(n, device=device, dtype=lse.dtype)
    # A row with no upstream gradient at all, and one with only the lse term.
    p_coef[2] = t_coef[2] = 0
    t_coef[3] = 0
    grad = backward_op(logits, target, weight, lse, p_coef, t_coef, IGNORE, label_smoothing, softcap)

    x = logits.double()
    z = soft_capped(x, softcap)
    t = target_distribution(target, num_classes, weight, IGNORE, label_smoothing, device)
    slope = 1 - (z / softcap) ** 2 if softcap > 0 else torch.ones_like(z)
    expected = (p_coef.double().unsqueeze(1) * z.softmax(1) - t_coef.double().unsqueeze(1) * t) * slope

    assert grad.dtype == dtype and grad.shape == logits.shape
    assert bool((grad[2] == 0).all())
    if dtype == torch.bfloat16:
        # One bf16 rounding of a value computed in fp32.
        torch.testing.assert_close(grad.double(), expected, rtol=2**-8, atol=1e-6)
    else:
        torch.testing.assert_close(grad.double(), expected, **RAW_TOLERANCES[dtype])


@pytest.mark.parametrize("softcap", [0.0, 10.0])
@pytest.mark.parametrize("kind", ["index", "probs"])
def test_forward_op_autograd_through_loss_and_lse(device, kind, softcap):
    # z-loss style objectives differentiate lse as well as the loss; probability
    # targets get their own gradient. Compared with float64 autograd of the formulas.
    logits, target, weight = raw_problem(kind, 6, 40, torch.float32, device, weighted=True)
    a = torch.randn(6, device=device)
    b = torch.randn(6, device=device)

    x = logits.clone().requires_grad_(True)
    tgt = target.clone().requires_grad_(True) if kind == "probs" else target
    loss, lse, _ = forward_op(x, tgt, weight, IGNORE, 0.1, softcap)
    objective = (a * loss).sum() + (b * lse.square()).sum()
    inputs = (x, tgt) if kind == "probs" else (x,)
    grads = torch.autograd.grad(objective, inputs)

    x64 = logits.double().requires_grad_(True)
    tgt64 = target.double().requires_grad_(True) if kind == "probs" else target
    z = soft_capped(x64, softcap)
    t = target_distribution(tgt64, 40, weight, IGNORE, 0.1, device)
    lse64 = torch.logsumexp(z, dim=1)
    loss64 = (t * (lse64.unsqueeze(1) - z)).sum(1)
    objective64 = (a.double() * loss64).sum() + (b.double() * lse64.square()).sum()
    expected = torch.autograd.grad(objective64, (x64, tgt64) if kind == "probs" else (x64,))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# -- gradcheck -----------------------------------------------------------------------------

GRADCHECK_CASES = {
    "index_mean": dict(shape=(4, 6), kind="index", kwargs=dict(), reduction="mean"),
    "index_weight_smoothing_ignore_none": dict(
        shape=(5, 6), kind="index", kwargs=dict(weight=True, label_smoothing=0.2, ignore=True), reduction="none"
    ),
    "index_ignore_class_sum": dict(
        shape=(5, 4), kind="index", kwargs=dict(ignore=True, ignore_index=1), reduction="sum"
    ),
    "index_weight_mean": dict(shape=(5, 6), kind="index", kwargs=dict(weight=True, ignore=True), reduction="mean"),
    "k_dim_smoothing_mean": dict(shape=(2, 5, 3), kind="index", kwargs=dict(label_smoothing=0.3), reduction="mean"),
    "probs_mean": dict(shape=(4, 6), kind="probs", kwargs=dict(), reduction="mean"),
    "probs_weight_smoothing_none": dict(
        shape=(4, 6), kind="probs", kwargs=dict(weight=True, label_smoothing=0.25), reduction="none"
    ),
    "probs_k_dim_sum": dict(shape=(2, 4, 3), kind="probs", kwargs=dict(weight=True), reduction="sum"),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_gradcheck(device, case):
    spec = GRADCHECK_CASES[case]
    shape, options = spec["shape"], dict(spec["kwargs"])
    num_classes = shape[1]
    batch = shape[:1] + shape[2:]
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    kwargs = {"reduction": spec["reduction"]}
    if options.pop("weight", False):
        kwargs["weight"] = torch.rand(num_classes, dtype=torch.float64, device=device) + 0.5
    if "label_smoothing" in options:
        kwargs["label_smoothing"] = options.pop("label_smoothing")
    if spec["kind"] == "probs":
        # Probability targets are differentiable too (a learned teacher).
        target = torch.randn(shape, dtype=torch.float64, device=device).softmax(1).requires_grad_(True)
    else:
        target = torch.randint(0, num_classes, batch, device=device)
        if options.pop("ignore", False):
            ignore_index = options.pop("ignore_index", IGNORE)
            if ignore_index != IGNORE:
                kwargs["ignore_index"] = ignore_index
            target.view(-1)[::3] = ignore_index
    assert not options

    def fn(x, target):
        return fused_ce.cross_entropy(x, target, **kwargs)

    assert torch.autograd.gradcheck(fn, (x, target), eps=1e-6, atol=1e-7, rtol=1e-5)


# -- opcheck -------------------------------------------------------------------------------


def _opcheck_samples(device):
    """(name, forward args) covering index/probability targets, weight or not, softcap off/on."""
    samples = []
    for kind in ("index", "probs"):
        for weighted in (False, True):
            for softcap, label_smoothing in ((0.0, 0.0), (20.0, 0.1)):
                logits, target, weight = raw_problem(kind, 5, 11, torch.float32, device, weighted)
                logits.requires_grad_(True)
                if kind == "probs":
                    target.requires_grad_(True)
                name = f"{kind}-w{int(weighted)}-cap{softcap:g}"
                samples.append((name, (logits, target, weight, IGNORE, label_smoothing, softcap)))
    logits, target, weight = raw_problem("index", 4, 9, torch.bfloat16, device, True)
    samples.append(("bf16-index", (logits.requires_grad_(True), target, weight, IGNORE, 0.0, 0.0)))
    logits, target, weight = raw_problem("probs", 4, 9, torch.float64, device, True)
    samples.append(("f64-probs", (logits.requires_grad_(True), target, weight, IGNORE, 0.05, 30.0)))
    return samples


OPCHECK_SAMPLE_NAMES = [name for name, _ in _opcheck_samples("cpu")]


@pytest.mark.parametrize("sample", OPCHECK_SAMPLE_NAMES)
def test_opcheck_forward(device, sample):
    args = dict(_opcheck_samples(device))[sample]
    torch.library.opcheck(forward_op, args)


@pytest.mark.parametrize("sample", OPCHECK_SAMPLE_NAMES)
def test_opcheck_backward(device, sample):
    logits, target, weight, ignore_index, label_smoothing, softcap = dict(_opcheck_samples(device))[sample]
    logits, target = logits.detach(), target.detach()
    with torch.no_grad():
        _, lse, mass = forward_op(logits, target, weight, ignore_index, label_smoothing, softcap)
    t_coef = torch.randn_like(lse)
    p_coef = t_coef * mass
    args = (logits, target, weight, lse, p_coef, t_coef, ignore_index, label_smoothing, softcap)
    torch.library.opcheck(backward_op, args)


# -- torch.compile -------------------------------------------------------------------------

COMPILE_CASES = {
    "index_weight_smoothing_ignore": dict(kind="index", shape=(6, 33), kwargs=dict(label_smoothing=0.1, weighted=True)),
    "index_k_dim_sum": dict(kind="index", shape=(2, 33, 3), kwargs=dict(reduction="sum")),
    "probs_smoothing": dict(kind="probs", shape=(6, 33), kwargs=dict(label_smoothing=0.2)),
}


def _compile_problem(case, device, batch=None):
    spec = COMPILE_CASES[case]
    shape = list(spec["shape"])
    if batch is not None:
        shape[0] = batch
    kwargs = dict(spec["kwargs"])
    x = torch.randn(shape, device=device)
    if spec["kind"] == "probs":
        target = torch.randn(shape, device=device).softmax(1)
    else:
        target = torch.randint(0, shape[1], shape[:1] + shape[2:], device=device)
        target.view(-1)[::4] = IGNORE
    if kwargs.pop("weighted", False):
        kwargs["weight"] = torch.rand(shape[1], device=device) + 0.5
    return x, target, kwargs


def _loss_and_grad(fn, x, target, kwargs):
    x = x.clone().requires_grad_(True)
    loss = fn(x, target, **kwargs)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize(
    "case, backend",
    [
        # Inductor is the real target but slow to compile on a CPU: two cases; the
        # AOT-eager backend traces the same graphs (fake kernels, autograd) cheaply.
        ("index_weight_smoothing_ignore", "inductor"),
        ("probs_smoothing", "inductor"),
        ("index_weight_smoothing_ignore", "aot_eager"),
        ("index_k_dim_sum", "aot_eager"),
        ("probs_smoothing", "aot_eager"),
    ],
)
def test_compile_fullgraph_matches_eager(device, case, backend):
    torch._dynamo.reset()
    compiled = torch.compile(fused_ce.cross_entropy, fullgraph=True, backend=backend)
    # Two batch sizes: the second call exercises recompilation / dynamic shapes.
    for batch in (None, 10):
        x, target, kwargs = _compile_problem(case, device, batch)
        expected, expected_grad = _loss_and_grad(fused_ce.cross_entropy, x, target, kwargs)
        loss, grad = _loss_and_grad(compiled, x, target, kwargs)
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["index", "probs"])
def test_double_backward_matches_torch(device, kind):
    # F.cross_entropy is twice differentiable (gradient penalties, Hessian-vector
    # products); a drop-in must give the same second derivatives, not zeros.
    logits, target, weight = raw_problem(kind, 5, 8, torch.float32, device, weighted=True)
    kwargs = dict(weight=weight, label_smoothing=0.1)

    def second_derivative(fn):
        x = logits.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(x, target, **kwargs), x, create_graph=True)
        (hvp,) = torch.autograd.grad((grad * torch.linspace(-1, 1, 8, device=device)).sum(), x)
        return hvp

    expected = second_derivative(F.cross_entropy)
    assert bool(expected.abs().max() > 1e-3)
    torch.testing.assert_close(second_derivative(fused_ce.cross_entropy), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("kind", ["index", "probs"])
def test_backward_twice_with_retain_graph(device, kind, reduction):
    # retain_graph=True lets a graph be differentiated again (e.g. two objectives
    # sharing a loss); each backward must add the same gradient, as with F.cross_entropy.
    logits, target, weight = raw_problem(kind, 6, 10, torch.float32, device, weighted=True)
    kwargs = dict(weight=weight, label_smoothing=0.1, reduction=reduction)

    def twice(fn):
        x = logits.clone().requires_grad_(True)
        loss = fn(x, target, **kwargs)
        upstream = torch.linspace(0.5, 2.0, loss.numel(), device=device).reshape(loss.shape)
        loss.backward(upstream, retain_graph=True)
        first = x.grad.clone()
        loss.backward(upstream)
        return first, x.grad

    expected_first, expected_total = twice(F.cross_entropy)
    first, total = twice(fused_ce.cross_entropy)
    torch.testing.assert_close(first, expected_first, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, expected_total, rtol=1e-5, atol=1e-6)


def test_device_check_traces_without_a_graph_break():
    # cross_entropy checks a CUDA input's build with cuda_kernels_available(); under
    # torch.compile(fullgraph=True) that check must be a constant, not a dispatcher query.
    def f(x):
        return x + 1 if fused_ce.cuda_kernels_available() else x - 1

    x = torch.zeros(3)
    expected = f(x)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x), expected)


# -- mutating ops: what they write, and the version counter ---------------------------------


def _mutating_op_calls(device):
    """One sample call for each op of the library whose schema writes a tensor: name -> (call, written tensor)."""
    logits, target, _ = raw_problem("index", 6, 9, torch.float32, device, weighted=False)
    rows = torch.ones(6, device=device)
    lse = torch.logsumexp(logits, 1)
    options = (IGNORE, 0.0, 0.0)
    grad = torch.empty_like(logits)
    inplace_logits = logits.clone()
    return {
        "scale_rows_": (lambda: torch.ops.fused_ce.scale_rows_(grad, rows * 2), grad),
        "cross_entropy_fused_": (
            lambda: torch.ops.fused_ce.cross_entropy_fused_(inplace_logits, target, None, rows, None, *options),
            inplace_logits,
        ),
        "cross_entropy_backward_into_": (
            lambda: torch.ops.fused_ce.cross_entropy_backward_into_(
                grad, logits, target, None, lse, rows, rows, rows * 0, *options
            ),
            grad,
        ),
        "cross_entropy_backward_": (
            lambda: torch.ops.fused_ce.cross_entropy_backward_(inplace_logits, target, None, lse, rows, rows, *options),
            inplace_logits,
        ),
    }


def _mutating_op_names() -> set[str]:
    names = set()
    for schema in torch._C._jit_get_all_schemas():
        if schema.name.startswith("fused_ce::") and any(
            a.alias_info is not None and a.alias_info.is_write for a in schema.arguments
        ):
            names.add(schema.name.removeprefix("fused_ce::"))
    return names


def test_every_mutating_op_bumps_the_version_of_what_it_writes(device):
    # Autograd relies on it to refuse a backward that would read overwritten tensors.
    calls = _mutating_op_calls(device)
    assert set(calls) == _mutating_op_names(), "a mutating op needs a sample call here"
    for name, (call, written) in calls.items():
        before = written._version
        call()
        assert written._version == before + 1, name


def test_backward_into_refuses_a_buffer_that_overlaps_the_logits(device):
    # Writing the gradient over the logits is the job of cross_entropy_backward_, whose
    # schema says it writes them.
    logits, target, _ = raw_problem("index", 6, 9, torch.float32, device, weighted=False)
    rows = torch.ones(6, device=device)
    lse = torch.logsumexp(logits, 1)
    for grad in (logits, logits[:, :]):
        with pytest.raises(RuntimeError, match="single memory location"):
            torch.ops.fused_ce.cross_entropy_backward_into_(grad, logits, target, None, lse, rows, rows, rows * 0,
                                                            IGNORE, 0.0, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_backward_in_place_matches_out_of_place(device, dtype):
    logits, target, weight = raw_problem("index", 33, 1000, dtype, device, weighted=True)
    lse = torch.logsumexp(logits.float(), 1)
    p_coef, t_coef = torch.rand(33, device=device), torch.rand(33, device=device)
    options = (IGNORE, 0.1, 12.0)
    expected = torch.ops.fused_ce.cross_entropy_backward(logits, target, weight, lse, p_coef, t_coef, *options)
    in_place = logits.clone()
    torch.ops.fused_ce.cross_entropy_backward_(in_place, target, weight, lse, p_coef, t_coef, *options)
    assert torch.equal(in_place, expected)


def test_fused_path_backward_twice_does_not_trip_on_its_own_buffer(device):
    # The first backward writes into the buffer the forward made; a second one (retain_graph)
    # must recompute rather than read a tensor whose version moved.
    x = torch.randn(5, 40, device=device, requires_grad=True)
    target = torch.randint(0, 40, (5,), device=device)
    loss = fused_ce.cross_entropy(x * 1.0, target)
    (first,) = torch.autograd.grad(loss, x, torch.tensor(0.5, device=device), retain_graph=True)
    (second,) = torch.autograd.grad(loss, x, torch.tensor(0.5, device=device))
    torch.testing.assert_close(first, second, rtol=0, atol=0)


# -- torch.compile with float options that change between calls --------------------------

_FLOAT_OPTIONS = {
    "z_loss": (1e-4, 2e-4, 3e-4),
    "softcap": (20.0, 25.0, 30.0),
    "label_smoothing": (0.05, 0.1, 0.2),
    "temperature": (0.7, 1.3, 2.0),
    "logit_scale": (0.5, 0.8, 1.5),
}


def _float_option_call(function, x, w, target, option, value):
    if function == "cross_entropy":
        return fused_ce.cross_entropy(x @ w.T, target, **{option: value})
    if function == "linear_cross_entropy":
        return fused_ce.linear_cross_entropy(x, w, target, **{option: value})
    return fused_ce.focal_loss(x @ w.T, target, gamma=value * 10)  # gamma: the focal loss's float option


@pytest.mark.parametrize("option", list(_FLOAT_OPTIONS))
@pytest.mark.parametrize("function", ["cross_entropy", "linear_cross_entropy", "focal_loss"])
def test_compile_fullgraph_with_a_float_option_that_changes(device, function, option):
    # The second value makes dynamo trace the float as a symbol: checking it must not
    # break the graph (math.isfinite on a symbolic float does), and the results must
    # follow the value rather than a specialised constant.
    if function == "focal_loss" and option != "z_loss":
        pytest.skip("the focal loss has one float option, gamma")
    torch._dynamo.reset()
    x = torch.randn(12, 8, device=device, requires_grad=True)
    w = torch.randn(30, 8, device=device, requires_grad=True)
    target = torch.randint(0, 30, (12,), device=device)
    target[::5] = IGNORE
    compiled = torch.compile(_float_option_call, fullgraph=True, backend="aot_eager", dynamic=None)
    for value in _FLOAT_OPTIONS[option]:
        got = compiled(function, x, w, target, option, value)
        (got_grad,) = torch.autograd.grad(got, x)
        want = _float_option_call(function, x, w, target, option, value)
        (want_grad,) = torch.autograd.grad(want, x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_compile_fullgraph_refuses_a_bad_float_option():
    # A value the checks refuse still raises (no silent wrong number), also once the
    # option is symbolic.
    torch._dynamo.reset()
    compiled = torch.compile(fused_ce.cross_entropy, fullgraph=True, backend="aot_eager")
    x, target = torch.randn(4, 6), torch.randint(0, 6, (4,))
    for value in (1e-4, 2e-4):
        compiled(x, target, z_loss=value)
    with pytest.raises(RuntimeError, match=r"z_loss|[Oo]bserved exception"):
        compiled(x, target, z_loss=-1.0)
    torch._dynamo.reset()
