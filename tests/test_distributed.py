"""fused_ce.distributed on real process groups, against F.cross_entropy on the full logits.

Spawning processes that import torch takes seconds, so one pool of four ranks
(gloo over a file:// rendezvous) serves the whole module: its workers form groups
of 1, 2, 3 and 4 ranks once, and each test sends one case to every worker, which
builds the full problem from a shared seed, runs its slice, compares it with the
single-process reference computed on the full logits, and sends back its loss (so
the test can check that every rank got bitwise the same). Slices are uneven, one of
them a single class. Each case loops over the reductions, dtypes and both merge
strategies (one all_gather; a MAX and a SUM all-reduce) itself.

With four CUDA GPUs the pool also joins an NCCL backend and the ``cuda`` twins run;
without, they are reported as skipped.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import queue
import tempfile
import traceback
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fused_ce
import fused_ce.distributed as fd
import fused_ce.distributed.merge as fd_merge
from fused_ce.reference import torch_cross_entropy

POOL_SIZE = 4
# Uneven vocabulary slices per group size; the size-1 slice makes most rows' targets
# land elsewhere, and some slices own no target at all.
SLICES = {1: [53], 2: [37, 64], 3: [50, 1, 80], 4: [23, 40, 7, 61]}
REDUCTIONS = ("none", "mean", "sum")
STRATEGIES = {"all_gather": POOL_SIZE, "all_reduce": 0}  # values of fd_merge.ALL_GATHER_MAX_RANKS
TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}
COLLECTIVE_TIMEOUT_S = 30  # a rank that raised leaves the others waiting this long
CASE_TIMEOUT_S = 120

_HAS_NCCL_POOL = (
    torch.cuda.is_available()
    and torch.cuda.device_count() >= POOL_SIZE
    and dist.is_nccl_available()
    and fused_ce.cuda_kernels_available()
)
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=pytest.mark.skipif(
            not _HAS_NCCL_POOL, reason=f"needs {POOL_SIZE} CUDA GPUs, NCCL and fused_ce's CUDA kernels"
        ),
    ),
]


# -- the pool ------------------------------------------------------------------------------


def _serve(rank: int, init_file: str, use_cuda: bool, tasks, results) -> None:
    """A worker: joins the process group, then runs cases until it receives None."""
    torch.set_num_threads(1)  # four ranks share the machine
    backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=POOL_SIZE,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    # new_group is collective: every rank creates every group, in the same order.
    groups = {size: dist.new_group(list(range(size))) for size in (1, 2, 3)}
    groups[POOL_SIZE] = dist.group.WORLD
    while (task := tasks.get()) is not None:
        name, size, kwargs = task
        if rank >= size:
            results.put((rank, "ok", None))
            continue
        try:
            results.put((rank, "ok", globals()[name](groups[size], rank, size, **kwargs)))
        except _Mismatch as e:
            results.put((rank, "mismatch", str(e)))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class _Pool:
    def __init__(self, use_cuda: bool):
        ctx = mp.get_context("spawn")
        self._dir = tempfile.TemporaryDirectory()
        init_file = os.path.join(self._dir.name, "rendezvous")
        self._tasks = [ctx.Queue() for _ in range(POOL_SIZE)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(target=_serve, args=(r, init_file, use_cuda, self._tasks[r], self._results), daemon=True)
            for r in range(POOL_SIZE)
        ]
        for p in self._procs:
            p.start()
        self.broken = False

    def run(self, case: str, size: int, **kwargs) -> list:
        """Runs case(group, rank, size, **kwargs) on ranks 0..size-1; returns their results in rank order."""
        for q in self._tasks:
            q.put((case, size, kwargs))
        outcomes = {}
        try:
            while len(outcomes) < POOL_SIZE:
                rank, status, value = self._results.get(timeout=CASE_TIMEOUT_S)
                outcomes[rank] = (status, value)
        except queue.Empty:
            self.broken = True
            pytest.fail(f"{case}: no answer from ranks {sorted(set(range(POOL_SIZE)) - set(outcomes))} "
                        f"within {CASE_TIMEOUT_S} s")
        failures = [f"rank {r} ({status}):\n{v}" for r, (status, v) in sorted(outcomes.items()) if status != "ok"]
        if failures:
            # Mismatches are reported at the end of a case, after every collective; an
            # error may have left ranks out of step (or waiting): start afresh then.
            self.broken = any(status == "error" for status, _ in outcomes.values())
            pytest.fail(f"{case} failed\n" + "\n".join(failures), pytrace=False)
        return [outcomes[r][1] for r in range(size)]

    def close(self) -> None:
        for q in self._tasks:
            q.put(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self._dir.cleanup()


@pytest.fixture(scope="module")
def _pools():
    pools: dict[str, _Pool] = {}  # by device
    yield pools
    for pool in pools.values():
        pool.close()


@pytest.fixture
def pool(_pools, request):
    """The module's pool for the test's device (started on first use, restarted after a failure)."""
    device = request.node.callspec.params.get("device", "cpu") if hasattr(request.node, "callspec") else "cpu"
    current = _pools.get(device)
    if current is None or current.broken:
        if current is not None:
            current.close()
        _pools[device] = current = _Pool(use_cuda=device == "cuda")
    return current


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _same_on_every_rank(values: list) -> None:
    for r, v in enumerate(values[1:], 1):
        torch.testing.assert_close(v, values[0], rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m, r=r: f"rank {r}'s losses differ from rank 0's: {m}")


# -- helpers run inside the workers ---------------------------------------------------------


def _slice_of(size: int, rank: int) -> slice:
    start = sum(SLICES[size][:rank])
    return slice(start, start + SLICES[size][rank])


def _problem(seed: int, size: int, batch_shape, *, ignore=False, ignore_index=-100, weight=False, device="cpu"):
    """Full logits [*batch_shape, V] (float64), targets and class weights, the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    num_classes = sum(SLICES[size])
    logits = 3 * torch.randn(*batch_shape, num_classes, generator=gen, dtype=torch.float64)
    target = torch.randint(0, num_classes, batch_shape, generator=gen)
    if ignore:
        target.view(-1)[1::3] = ignore_index
    class_weight = torch.rand(num_classes, generator=gen, dtype=torch.float64) + 0.5 if weight else None
    upstream = {
        r: torch.randn(batch_shape if r == "none" else (), generator=gen, dtype=torch.float64) for r in REDUCTIONS
    }
    to = lambda t: None if t is None else t.to(device)
    return to(logits), to(target), to(class_weight), {k: to(v) for k, v in upstream.items()}


def _reference(logits, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
               softcap=None):
    """F.cross_entropy on the full logits (classes last), plus fused_ce's z-loss and soft-cap, in float64."""
    z = logits.double()
    rows, t = z.reshape(-1, z.shape[-1]), target.reshape(-1)
    w = None if weight is None else weight.double()
    loss = torch_cross_entropy(rows, t, weight=w, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap or None)
    return loss.reshape(target.shape) if reduction == "none" else loss


class _Mismatch(AssertionError):
    pass


class _Checks:
    """Mismatches collected, not raised, so that a rank that sees one still takes part in
    the collectives of the case's remaining sub-cases (else the others would wait for it
    until the timeout); done() raises them all at the end."""

    def __init__(self):
        self.failures: list[str] = []

    def close(self, actual, expected, dtype, what: str) -> None:
        try:
            torch.testing.assert_close(actual.double(), expected.double(), equal_nan=True, **TOLERANCES[dtype])
        except AssertionError as e:
            self.failures.append(f"{what}: {e}")

    def true(self, condition, what: str) -> None:
        if not condition:
            self.failures.append(what)

    def done(self) -> None:
        if self.failures:
            raise _Mismatch("\n".join(self.failures))


# -- cases (run on every rank of a group) -----------------------------------------------------


def case_logits(group, rank, size, *, seed, options, batch_shape, dtypes, device="cpu"):
    """vocab_parallel_cross_entropy vs the reference, for every reduction, dtype and merge strategy."""
    options = dict(options)
    make = {k: options.pop(k) for k in ("ignore", "weight") if k in options}
    logits64, target, weight64, upstreams = _problem(seed, size, batch_shape, ignore_index=options.get(
        "ignore_index", -100), device=device, **make)
    mine = _slice_of(size, rank)
    losses, check = [], _Checks()
    for dtype in dtypes:
        logits = logits64.to(dtype)
        weight = None if weight64 is None else weight64.to(dtype)
        for reduction in REDUCTIONS:
            full = logits.double().requires_grad_()
            expected = _reference(full, target, weight=weight, reduction=reduction, **options)
            (expected_grad,) = torch.autograd.grad(expected, full, upstreams[reduction])
            for strategy, threshold in STRATEGIES.items():
                fd_merge.ALL_GATHER_MAX_RANKS = threshold
                shard = logits[..., mine].clone().requires_grad_()
                loss = fd.vocab_parallel_cross_entropy(
                    shard, target, group=group, reduction=reduction,
                    weight=None if weight is None else weight[mine], **options,
                )
                (grad,) = torch.autograd.grad(loss, shard, upstreams[reduction].to(dtype))
                what = f"{dtype} {reduction} {strategy}"
                check.true(loss.dtype == dtype and loss.shape == expected.shape, f"{what}: dtype or shape")
                check.close(loss, expected, dtype, f"{what}: loss")
                check.close(grad, expected_grad[..., mine], dtype, f"{what}: gradient")
                losses.append(loss.detach().double().reshape(-1).cpu())
    fd_merge.ALL_GATHER_MAX_RANKS = STRATEGIES["all_gather"]
    check.done()
    return torch.cat(losses)


def case_low_precision(group, rank, size, *, seed, dtype, device="cpu"):
    """At fp16/bf16 the error against float64 is at most twice F.cross_entropy's own, plus a tiny floor."""
    logits64, target, _, upstreams = _problem(seed, size, (29,), ignore=True, device=device)
    logits = logits64.to(dtype)
    mine = _slice_of(size, rank)
    options = dict(label_smoothing=0.1)
    check = _Checks()
    for reduction in REDUCTIONS:
        full64 = logits.double().requires_grad_()
        expected = _reference(full64, target, reduction=reduction, **options)
        (expected_grad,) = torch.autograd.grad(expected, full64, upstreams[reduction])
        full = logits.clone().requires_grad_()
        theirs = F.cross_entropy(full, target, reduction=reduction, **options)
        (their_grad,) = torch.autograd.grad(theirs, full, upstreams[reduction].to(dtype))
        shard = logits[:, mine].clone().requires_grad_()
        loss = fd.vocab_parallel_cross_entropy(shard, target, group=group, reduction=reduction, **options)
        (grad,) = torch.autograd.grad(loss, shard, upstreams[reduction].to(dtype))
        check.true(loss.dtype == dtype and grad.dtype == dtype, f"{reduction}: dtypes")
        for what, ours, torch_value, exact in (
            ("loss", loss, theirs, expected),
            ("gradient", grad, their_grad[:, mine], expected_grad[:, mine]),
        ):
            error = float((ours.double() - exact).abs().max())
            torch_error = float((torch_value.double() - exact).abs().max())
            floor = 1e-6 * float(exact.abs().max()) + 1e-8
            check.true(error <= 2 * torch_error + floor,
                       f"{reduction} {what}: error {error:.3g} vs float64, PyTorch's own {torch_error:.3g}")
    check.done()
    return loss.detach().double().reshape(-1).cpu()


def case_all_ignored(group, rank, size, *, device="cpu"):
    """Every target ignored: 'mean' is NaN with a zero gradient, 'sum' is 0, as in F.cross_entropy."""
    logits64, target, _, _ = _problem(1, size, (5,), device=device)
    target.fill_(-100)
    mine = _slice_of(size, rank)
    check = _Checks()
    for threshold in STRATEGIES.values():
        fd_merge.ALL_GATHER_MAX_RANKS = threshold
        for reduction, z_loss in (("mean", 0.0), ("mean", 1e-3), ("sum", 1e-3)):
            shard = logits64[:, mine].clone().requires_grad_()
            loss = fd.vocab_parallel_cross_entropy(shard, target, group=group, reduction=reduction, z_loss=z_loss)
            loss.backward()
            check.true(loss.isnan() if reduction == "mean" else loss == 0, f"{reduction}, z_loss={z_loss}: {loss}")
            check.true(torch.equal(shard.grad, torch.zeros_like(shard)), f"{reduction}, z_loss={z_loss}: gradient")
    fd_merge.ALL_GATHER_MAX_RANKS = STRATEGIES["all_gather"]
    check.done()
    return loss.detach().reshape(-1).cpu()


def case_layout_arguments(group, rank, size):
    """vocab_sizes, vocab_start/vocab_total and discovery agree; bad layouts raise on every rank."""
    logits, target, _, _ = _problem(2, size, (11,))
    mine = _slice_of(size, rank)
    shard = logits[:, mine]
    found = fd.vocab_parallel_cross_entropy(shard, target, group=group)
    by_sizes = fd.vocab_parallel_cross_entropy(shard, target, group=group, vocab_sizes=SLICES[size])
    by_start = fd.vocab_parallel_cross_entropy(
        shard, target, group=group, vocab_start=mine.start, vocab_total=sum(SLICES[size])
    )
    check = _Checks()
    check.true(torch.equal(found, by_sizes) and torch.equal(found, by_start), "the layout arguments change the loss")
    bad = [
        (dict(vocab_sizes=SLICES[size] + [3]), "one entry per rank"),
        (dict(vocab_sizes=[s + 1 for s in SLICES[size]]), "holds"),
        (dict(vocab_start=0), "together"),
        (dict(vocab_sizes=SLICES[size], vocab_start=0, vocab_total=5), "not both"),
        (dict(vocab_start=sum(SLICES[size]), vocab_total=sum(SLICES[size])), "must lie within"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            fd.vocab_parallel_cross_entropy(shard, target, group=group, **kwargs)
    with pytest.raises(IndexError, match="out of range"):  # a class index beyond the full vocabulary
        fd.vocab_parallel_cross_entropy(shard, torch.full_like(target, sum(SLICES[size])), group=group,
                                        vocab_sizes=SLICES[size])
    check.done()
    return found.reshape(-1)


@contextlib.contextmanager
def _collectives_logged(log: list):
    """Within it, torch.distributed's collectives append (name, bytes this rank contributes) to log."""
    names = ["all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "broadcast", "reduce",
             "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter",
             "send", "recv", "isend", "irecv", "barrier"]
    saved = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            # For the gathers, the first argument is the output: count what this rank sends.
            sent = tensors[1:] if name.startswith("all_gather") and len(tensors) > 1 else tensors[:1]
            log.append((name, sum(t.numel() * t.element_size() for t in sent)))
            return fn(*args, **kwargs)

        return counted

    for n, fn in saved.items():
        setattr(dist, n, wrap(n, fn))
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(dist, n, fn)


def case_bytes_per_call(group, rank, size, *, num_rows):
    """The bytes a call communicates do not depend on V; backward communicates nothing."""
    report, check = {}, _Checks()
    for strategy, threshold in STRATEGIES.items():
        fd_merge.ALL_GATHER_MAX_RANKS = threshold
        for scale in (1, 100):  # V = 100ish and 10000ish classes in all
            sizes = [s * scale for s in SLICES[size]]
            gen = torch.Generator().manual_seed(3)
            logits = torch.randn(num_rows, sizes[rank], generator=gen, requires_grad=True)
            target = torch.randint(0, sum(sizes), (num_rows,), generator=gen)
            for layout in ({}, {"vocab_sizes": sizes}):
                forward_log, backward_log = [], []
                with _collectives_logged(forward_log):
                    loss = fd.vocab_parallel_cross_entropy(logits, target, group=group, **layout)
                with _collectives_logged(backward_log):
                    loss.backward()
                check.true(backward_log == [], f"{strategy}: backward communicated {backward_log}")
                report[(strategy, bool(layout), scale)] = forward_log
    fd_merge.ALL_GATHER_MAX_RANKS = STRATEGIES["all_gather"]
    check.done()
    return report


def case_linear(group, rank, size, *, seed, options, batch_shape, hidden, dtype, chunk_size, bias, reduce_input_grad,
                device="cpu"):
    """vocab_parallel_linear_cross_entropy vs the reference on the full logits, gradients of input, weight, bias."""
    options = dict(options)
    make = {k: options.pop(k) for k in ("ignore", "weight") if k in options}
    _, target, class_weight, upstreams = _problem(seed, size, batch_shape, device=device, **make)
    gen = torch.Generator().manual_seed(seed + 1)
    num_classes = sum(SLICES[size])
    x = torch.randn(*batch_shape, hidden, generator=gen, dtype=torch.float64).to(device, dtype)
    w = (torch.randn(num_classes, hidden, generator=gen, dtype=torch.float64) / hidden**0.5).to(device, dtype)
    b = torch.randn(num_classes, generator=gen, dtype=torch.float64).to(device, dtype) if bias else None
    mine = _slice_of(size, rank)
    losses, check = [], _Checks()
    for reduction in REDUCTIONS:
        full = [t.double().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
        logits = F.linear(*full)
        expected = _reference(logits, target, weight=class_weight, reduction=reduction, **options)
        expected_grads = torch.autograd.grad(expected, full, upstreams[reduction])
        for strategy, threshold in STRATEGIES.items():
            fd_merge.ALL_GATHER_MAX_RANKS = threshold
            ours = [x.clone().requires_grad_(), w[mine].clone().requires_grad_()]
            if bias:
                ours.append(b[mine].clone().requires_grad_())
            loss = fd.vocab_parallel_linear_cross_entropy(
                ours[0], ours[1], target, bias_shard=ours[2] if bias else None, group=group, reduction=reduction,
                class_weight=None if class_weight is None else class_weight[mine].to(dtype), chunk_size=chunk_size,
                reduce_input_grad=reduce_input_grad, **options,
            )
            grads = torch.autograd.grad(loss, ours, upstreams[reduction].to(dtype))
            what = f"{reduction} {strategy}"
            check.true(loss.dtype == dtype and loss.shape == expected.shape, f"{what}: dtype or shape")
            check.close(loss, expected, dtype, f"{what}: loss")
            grad_x = grads[0]
            if not reduce_input_grad:  # this rank's part: the sum over ranks is the gradient
                grad_x = grad_x.clone()
                dist.all_reduce(grad_x, group=group)
            check.close(grad_x, expected_grads[0], dtype, f"{what}: input gradient")
            check.close(grads[1], expected_grads[1][mine], dtype, f"{what}: weight gradient")
            if bias:
                check.close(grads[2], expected_grads[2][mine], dtype, f"{what}: bias gradient")
            losses.append(loss.detach().double().reshape(-1).cpu())
    fd_merge.ALL_GATHER_MAX_RANKS = STRATEGIES["all_gather"]
    check.done()
    return torch.cat(losses)


def case_linear_autocast(group, rank, size):
    """Under autocast the head runs as on inputs cast to autocast's dtype; fp32 parameters get fp32 gradients."""
    _, target, _, _ = _problem(5, size, (12,))
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(12, 8, generator=gen)
    w = torch.randn(SLICES[size][rank], 8, generator=gen)
    results = []
    for autocast in (True, False):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            a, b = (xs, ws) if autocast else (xs.bfloat16(), ws.bfloat16())
            # Under autocast the loss is float32 (as F.cross_entropy's there); cast first,
            # the same float32 value is asked for with loss_dtype.
            extra = {} if autocast else dict(loss_dtype=torch.float32)
            loss = fd.vocab_parallel_linear_cross_entropy(a, b, target, group=group, chunk_size=5, **extra)
            loss.backward()
        results.append((loss, xs.grad, ws.grad))
    check = _Checks()
    check.true(results[0][0].dtype == torch.float32, "the loss under autocast is not float32")
    logits = torch.randn(12, SLICES[size][rank], generator=gen).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = fd.vocab_parallel_cross_entropy(logits, target, group=group)
    check.true(plain.dtype == torch.float32, "the logits' loss under autocast is not float32")
    check.true(torch.equal(plain, fd.vocab_parallel_cross_entropy(logits, target, group=group,
                                                                  loss_dtype=torch.float32)),
               "the logits' loss under autocast differs from loss_dtype=float32")
    check.true(results[0][1].dtype == results[0][2].dtype == torch.float32, "the gradients are not float32")
    for what, ours, cast_first in zip(("loss", "input gradient", "weight gradient"), *results):
        check.true(torch.equal(ours, cast_first), f"{what} differs from casting to bfloat16 first")
    check.done()
    return results[0][0].detach().reshape(-1)


def case_empty_inputs(group, rank, size):
    """No rows, in any layout (a sliced or transposed empty view): PyTorch's empty/zero/NaN results, empty gradients."""
    check = _Checks()
    vocab = sum(SLICES[size])
    mine = _slice_of(size, rank)
    layouts = {
        "rows": torch.randn(0, vocab)[:, mine],
        "transposed": torch.randn(vocab, 0).t()[:, mine],
        "positions": torch.randn(2, 0, vocab)[..., mine],
    }
    for name, shard in layouts.items():
        target = torch.zeros(shard.shape[:-1], dtype=torch.long)
        for reduction in ("none", "mean", "sum"):
            x = shard.detach().requires_grad_(True)
            loss = fd.vocab_parallel_cross_entropy(x, target, group=group, reduction=reduction,
                                                   vocab_sizes=SLICES[size])
            want = F.cross_entropy(torch.zeros(0, vocab), torch.zeros(0, dtype=torch.long), reduction=reduction)
            check.true(loss.shape == (target.shape if reduction == "none" else ()), f"{name} {reduction}: shape")
            check.close(loss.reshape(-1)[:1], want.reshape(-1)[:1], torch.float32, f"{name} {reduction}")
            loss.sum().backward()
            check.true(x.grad.shape == x.shape, f"{name} {reduction}: gradient shape")
        h = torch.randn(*shard.shape[:-1], 6, requires_grad=True)
        w = torch.randn(SLICES[size][rank], 6, requires_grad=True)
        loss = fd.vocab_parallel_linear_cross_entropy(h, w, target, group=group, vocab_sizes=SLICES[size])
        loss.backward()
        check.true(math.isnan(loss.item()) and h.grad.shape == h.shape and bool((w.grad == 0).all()),
                   f"{name}: linear")
    check.done()
    return torch.zeros(1)


def case_dtensor(group, rank, size):
    """DTensor logits sharded on the class dimension (and a sharded LM head): F.cross_entropy on the full
    tensor, and torch's own loss_parallel, give the same loss and gradients; a replicated DTensor comes back."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    check = _Checks()
    mesh = DeviceMesh.from_group(group, "cpu")
    gen = torch.Generator().manual_seed(11)
    vocab = 53  # uneven over 2 and 3 ranks
    full = torch.randn(10, vocab, generator=gen, dtype=torch.float64) * 2
    every_row = torch.randint(0, vocab, (10,), generator=gen)
    some_ignored = torch.where(torch.arange(10) % 4 == 0, -100, every_row)
    class_weight = torch.rand(vocab, generator=gen, dtype=torch.float64) + 0.5
    for target, kwargs in ((every_row, dict()), (every_row, dict(label_smoothing=0.1, reduction="sum")),
                           (every_row, dict(weight=class_weight, reduction="none")),
                           (some_ignored, dict(z_loss=1e-3, softcap=5.0))):
        # torch's loss_parallel (2.14) fails on label smoothing (an in-place masked_fill on a
        # Partial DTensor) and has no z_loss/softcap: there, the full logits are the reference.
        torch_has = not ({"label_smoothing", "z_loss", "softcap"} & set(kwargs))
        impls = ("fused_ce", "loss_parallel", "full") if torch_has else ("fused_ce", "full")
        results = {}
        for impl in impls:
            if impl == "full":
                x = full.clone().requires_grad_(True)
                loss = torch_cross_entropy(x, target, **kwargs)
                loss.backward(torch.ones_like(loss))
                results[impl] = (loss.detach(), x.grad)
                continue
            x = distribute_tensor(full.clone(), mesh, [Shard(1)]).requires_grad_(True)
            # loss_parallel takes DTensors only; fused_ce takes both.
            dt_target = distribute_tensor(target, mesh, [Replicate()])
            dt_kwargs = {k: distribute_tensor(v, mesh, [Replicate()]) if torch.is_tensor(v) else v
                         for k, v in kwargs.items()}
            if impl == "fused_ce":
                loss = fused_ce.cross_entropy(x, target if "weight" in kwargs else dt_target, **kwargs)
            else:
                with loss_parallel():
                    loss = F.cross_entropy(x, dt_target, **dt_kwargs)
            check.true(isinstance(loss, DTensor) and loss.placements == (Replicate(),), f"{impl}: not replicated")
            with loss_parallel() if impl == "loss_parallel" else contextlib.nullcontext():
                loss.backward(torch.ones_like(loss))
            results[impl] = (loss.full_tensor().detach(), x.grad.full_tensor())
        for impl in impls[:-1]:
            for what, got, want in zip(("loss", "gradient"), results[impl], results["full"]):
                check.close(got, want, torch.float64, f"{impl} {kwargs}: {what}")
    # The LM head sharded by vocabulary rows; the input a plain tensor, the same on every rank.
    h = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    w_full = torch.randn(vocab, 6, generator=gen, dtype=torch.float64)
    hs, ws = h.clone().requires_grad_(True), distribute_tensor(w_full.clone(), mesh, [Shard(0)]).requires_grad_(True)
    loss = fused_ce.linear_cross_entropy(hs, ws, target, z_loss=1e-3)
    loss.backward()
    h_ref, w_ref = h.clone().requires_grad_(True), w_full.clone().requires_grad_(True)
    want = fused_ce.linear_cross_entropy(h_ref, w_ref, target, z_loss=1e-3)
    want.backward()
    check.true(isinstance(loss, DTensor), "linear: not a DTensor")
    check.close(loss.full_tensor().detach(), want.detach(), torch.float64, "linear: loss")
    check.close(hs.grad, h_ref.grad, torch.float64, "linear: input gradient")
    check.close(ws.grad.full_tensor(), w_ref.grad, torch.float64, "linear: weight gradient")
    # Replicated logits: the local path on each rank's full copy.
    rep = distribute_tensor(full.clone(), mesh, [Replicate()])
    got = fused_ce.cross_entropy(rep, some_ignored, label_smoothing=0.2)
    check.true(isinstance(got, DTensor) and got.placements == (Replicate(),), "replicated: not a replicated DTensor")
    check.close(got.to_local(), F.cross_entropy(full, some_ignored, label_smoothing=0.2), torch.float64, "replicated")
    # Placements other than the class dimension's are refused.
    bad = distribute_tensor(full.clone(), mesh, [Shard(0)])
    check.true(_raises(lambda: fused_ce.cross_entropy(bad, target), ValueError), "Shard(0) was accepted")
    check.done()
    return loss.full_tensor().detach().reshape(-1)


def _raises(fn, error) -> bool:
    try:
        fn()
    except error:
        return True
    return False


def case_stats(group, rank, size):
    """return_stats: every rank gets the full rows' prediction (ties across a slice boundary to the lower class)."""
    check = _Checks()
    vocab = sum(SLICES[size])
    mine = _slice_of(size, rank)
    gen = torch.Generator().manual_seed(13)
    full = torch.randn(9, vocab, generator=gen)
    full[0, :] = 0.0  # every class tied: class 0
    boundary = SLICES[size][0] if size > 1 else 10  # the first class of rank 1's slice
    full[1, boundary - 1] = full[1, boundary] = full[1].max() + 1  # a tie across ranks 0 and 1
    target = torch.randint(0, vocab, (9,), generator=gen)
    target[2] = int(full[2].argmax())
    target[3] = -100
    stats = fd.vocab_parallel_cross_entropy(full[:, mine], target, group=group, z_loss=1e-3, return_stats=True)
    check.true(torch.equal(stats.predicted, full.argmax(1)), f"predicted {stats.predicted} vs {full.argmax(1)}")
    check.close(stats.lse, torch.logsumexp(full, 1), torch.float32, "lse")
    counted = target != -100
    check.close(stats.accuracy, (((full.argmax(1) == target) & counted).sum() / counted.sum()).float(),
                torch.float32, "accuracy")
    h = torch.randn(9, 6, generator=gen)
    w_full = torch.randn(vocab, 6, generator=gen)
    lin = fd.vocab_parallel_linear_cross_entropy(h, w_full[mine], target, group=group, chunk_size=(4, 8),
                                                 return_stats=True)
    check.true(torch.equal(lin.predicted, (h @ w_full.T).argmax(1)), "linear: predicted")
    check.done()
    return stats.predicted.double()


def case_linear_bytes(group, rank, size):
    """The fused head communicates O(N) statistics forward and, backward, only the input gradient."""
    report = {}
    for reduce_input_grad in (True, False):
        for scale in (1, 100):
            sizes = [s * scale for s in SLICES[size]]
            gen = torch.Generator().manual_seed(4)
            x = torch.randn(16, 8, generator=gen, requires_grad=True)
            w = torch.randn(sizes[rank], 8, generator=gen, requires_grad=True)
            target = torch.randint(0, sum(sizes), (16,), generator=gen)
            forward_log, backward_log = [], []
            with _collectives_logged(forward_log):
                loss = fd.vocab_parallel_linear_cross_entropy(
                    x, w, target, group=group, vocab_sizes=sizes, chunk_size=5, reduce_input_grad=reduce_input_grad
                )
            with _collectives_logged(backward_log):
                loss.backward()
            report[(reduce_input_grad, scale)] = (forward_log, backward_log)
    return report


# -- tests ---------------------------------------------------------------------------------

OPTIONS = {
    "plain": dict(),
    "ignore": dict(ignore=True),
    "ignore_class": dict(ignore=True, ignore_index=0),  # an ignore_index that is a real class
    "smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(softcap=4.0),
    "weight": dict(weight=True),
    "everything": dict(ignore=True, weight=True, label_smoothing=0.2, z_loss=1e-3, softcap=5.0),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("size", [2, 3, 4])
def test_matches_full_logits(pool, size, option, device):
    batch_shape = (3, 7) if option in ("plain", "everything") else (19,)  # (B, T, V_r) and (N, V_r)
    losses = pool.run(
        "case_logits", size, seed=_seed(size, option), options=OPTIONS[option], batch_shape=batch_shape,
        dtypes=(torch.float64, torch.float32), device=device,
    )
    _same_on_every_rank(losses)


def test_single_rank_group(pool):
    # A group of one rank holds the whole vocabulary: no communication, same results.
    pool.run("case_logits", 1, seed=1, options=OPTIONS["everything"], batch_shape=(9,), dtypes=(torch.float64,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("size", [2, 4])
def test_low_precision_as_accurate_as_torch(pool, size, dtype):
    _same_on_every_rank(pool.run("case_low_precision", size, seed=_seed(size, str(dtype)), dtype=dtype))


@pytest.mark.parametrize("size", [2, 3])
def test_all_targets_ignored(pool, size):
    _same_on_every_rank(pool.run("case_all_ignored", size))


@pytest.mark.parametrize("size", [3])
def test_layout_arguments(pool, size):
    _same_on_every_rank(pool.run("case_layout_arguments", size))


_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"


@pytest.mark.parametrize("size", [2, 4])
def test_bytes_per_call_do_not_grow_with_vocabulary(pool, size):
    num_rows = 32
    reports = pool.run("case_bytes_per_call", size, num_rows=num_rows)
    for report in reports:
        for (strategy, layout_given, scale), log in report.items():
            assert log == report[(strategy, layout_given, 1)], f"{strategy}: the collectives differ with V x {scale}"
            # Per row: loss, lse and mass in float32 (the all-reduce pair adds the MAX of lse);
            # finding the layout adds one int64 per rank.
            expected = [] if layout_given else [(_GATHER, 8)]
            if strategy == "all_gather":
                expected += [(_GATHER, 3 * 4 * num_rows)]
            else:
                expected += [("all_reduce", 4 * num_rows), ("all_reduce", 3 * 4 * num_rows)]
            assert log == expected, (strategy, layout_given, log)


def test_linear_communication(pool):
    for report in pool.run("case_linear_bytes", 3):
        for (reduce_input_grad, _scale), (forward_log, backward_log) in report.items():
            assert (forward_log, backward_log) == report[(reduce_input_grad, 1)]
            assert forward_log == [(_GATHER, 3 * 4 * 16)]
            assert backward_log == ([("all_reduce", 16 * 8 * 4)] if reduce_input_grad else [])


def test_linear_under_autocast(pool):
    _same_on_every_rank(pool.run("case_linear_autocast", 2))


LINEAR_OPTIONS = {
    "plain": dict(),
    "smoothing_z_loss": dict(label_smoothing=0.1, z_loss=1e-2),
    "everything": dict(ignore=True, weight=True, label_smoothing=0.2, z_loss=1e-3, softcap=3.0),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "option, bias, chunk_size, reduce_input_grad",
    [
        ("plain", False, None, True),
        ("plain", True, 1, False),
        ("smoothing_z_loss", True, 7, True),  # 7 does not divide the 21 rows
        ("everything", True, 4, False),
        ("everything", False, None, True),
        ("everything", True, (5, 4), True),  # blocks of 5 rows x 4 classes
        ("smoothing_z_loss", True, (None, 3), False),  # all rows x 3 classes
    ],
)
@pytest.mark.parametrize("size", [2, 3, 4])
def test_linear_matches_full_logits(pool, size, option, bias, chunk_size, reduce_input_grad, device):
    batch_shape = (3, 7) if option == "everything" else (21,)
    losses = pool.run(
        "case_linear", size, seed=_seed(size, option, chunk_size), options=LINEAR_OPTIONS[option],
        batch_shape=batch_shape, hidden=6, dtype=torch.float64, chunk_size=chunk_size, bias=bias,
        reduce_input_grad=reduce_input_grad, device=device,
    )
    _same_on_every_rank(losses)


@pytest.mark.parametrize("size", [2, 3])
def test_dtensor_matches_full_logits_and_loss_parallel(pool, size):
    _same_on_every_rank(pool.run("case_dtensor", size))


@pytest.mark.parametrize("size", [1, 2, 3])
def test_stats(pool, size):
    _same_on_every_rank(pool.run("case_stats", size))


@pytest.mark.parametrize("size", [1, 3])
def test_empty_inputs(pool, size):
    pool.run("case_empty_inputs", size)


@pytest.mark.parametrize("size", [2, 4])
def test_linear_float32(pool, size):
    pool.run("case_linear", size, seed=_seed(size), options=LINEAR_OPTIONS["smoothing_z_loss"], batch_shape=(40,),
             hidden=16, dtype=torch.float32, chunk_size=None, bias=True, reduce_input_grad=True)


def test_needs_an_initialized_process_group():
    if dist.is_initialized():
        pytest.skip("this process already belongs to a process group")
    with pytest.raises(RuntimeError, match="init_process_group"):
        fd.vocab_parallel_cross_entropy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(z_loss=-1.0), ValueError, "z_loss"),
        (dict(target=torch.zeros(4)), TypeError, "class indices"),
        (dict(target=torch.zeros(5, dtype=torch.long)), ValueError, r"target must have shape \(4,\)"),
        (dict(weight=torch.ones(4)), ValueError, "this rank's slice"),
    ],
)
def test_bad_arguments_raise_before_communicating(kwargs, error, message):
    # Checked before any collective, so no process group is needed to see them.
    args = dict(logits_shard=torch.randn(4, 3), target=torch.zeros(4, dtype=torch.long)) | kwargs
    with pytest.raises(error, match=message):
        fd.vocab_parallel_cross_entropy(args.pop("logits_shard"), args.pop("target"), **args)
