"""Reading a transformers model class's ``forward``: what it does to ``lm_head``'s output.

:func:`logit_transform` parses the class's ``forward`` (its syntax tree, so formatting
and comments do not matter) and returns the known post-processing of the logits it
finds (none, Gemma's soft-cap, Cohere's and Granite's scales) with its fused
equivalent, or raises, naming what it does not know -- rather than let the fused loss
differ from the stock model's.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from collections.abc import Callable

from torch import nn


@dataclasses.dataclass(frozen=True)
class LogitTransform:
    """What a family's forward does to ``lm_head``'s output before the loss, and its fused equivalent.

    ``code``: those statements (``ast.unparse`` form); ``fused(model)``: the ``(scale,
    softcap)`` that give the same logits, ``softcap * tanh(scale * (x W^T + b) /
    softcap)``, read from the model at every call (so later config changes count).
    """

    name: str
    code: str
    fused: Callable[[nn.Module], tuple[float | None, float | None]]


def _canonical(code: str) -> str:
    return "\n".join(ast.unparse(stmt) for stmt in ast.parse(textwrap.dedent(code)).body)


def _no_change(model) -> tuple[None, None]:
    return None, None


def _final_logit_softcapping(model) -> tuple[None, float | None]:
    return None, model.config.final_logit_softcapping


def _logit_scale(model) -> tuple[float, None]:
    return float(model.logit_scale), None


def _logits_scaling(model) -> tuple[float, None]:
    return 1.0 / float(model.config.logits_scaling), None


_TRANSFORMS = (
    LogitTransform("none", "", _no_change),
    # Gemma 2, Gemma 3 (text), Gemma 3n, ...
    LogitTransform(
        "final_logit_softcapping",
        _canonical(
            """
            if self.config.final_logit_softcapping is not None:
                logits = logits / self.config.final_logit_softcapping
                logits = torch.tanh(logits)
                logits = logits * self.config.final_logit_softcapping
            """
        ),
        _final_logit_softcapping,
    ),
    # Cohere, Cohere 2
    LogitTransform("logit_scale", _canonical("logits = logits * self.logit_scale"), _logit_scale),
    # Granite
    LogitTransform("logits_scaling", _canonical("logits = logits / self.config.logits_scaling"), _logits_scaling),
)


def _is_self_call(node: ast.AST, attribute: str) -> bool:
    """``node`` is ``self.<attribute>(...)``."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == attribute
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "self"
    )


def _contains(stmt: ast.AST, attribute: str) -> bool:
    return any(_is_self_call(node, attribute) for node in ast.walk(stmt))


def logit_transform(cls: type) -> LogitTransform:
    """Reads ``cls.forward`` and returns its logit post-processing; raises if the forward is not one we know."""
    name = cls.__name__

    def refuse(reason: str) -> NotImplementedError:
        return NotImplementedError(
            f"fused_ce.integrations.transformers cannot patch {name}: {reason}. It supports causal LMs whose "
            "forward computes `logits = self.lm_head(hidden_states)` once, optionally post-processes them as "
            f"one of {[t.name for t in _TRANSFORMS]}, and then calls `self.loss_function(logits, labels, ...)`"
        )

    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError) as e:
        raise refuse(f"the source of its forward is not available ({e})") from None
    func = ast.parse(textwrap.dedent(source)).body[0]
    if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise refuse("its forward is not a plain function")
    calls = {attr: sum(_is_self_call(n, attr) for n in ast.walk(func)) for attr in ("lm_head", "loss_function")}
    if calls != {"lm_head": 1, "loss_function": 1}:
        raise refuse(
            f"its forward calls self.lm_head {calls['lm_head']} times and self.loss_function "
            f"{calls['loss_function']} times (once each expected)"
        )
    body = func.body
    head = next(i for i, stmt in enumerate(body) if _contains(stmt, "lm_head"))
    loss = next((i for i, stmt in enumerate(body) if _contains(stmt, "loss_function")), -1)
    if not _is_logits_assignment(body[head]):
        raise refuse(f"its forward's lm_head statement is `{ast.unparse(body[head])}`")
    if loss < head:
        raise refuse("its forward computes the loss before lm_head, or inside another statement")
    if not _loss_takes_logits(body[loss]):
        raise refuse("its forward does not pass `logits` to self.loss_function")
    # After lm_head, the (here empty) logits may only go to the loss and into the output.
    if _logits_uses(body[loss]) != 1:
        raise refuse(f"its forward uses the logits for more than the loss:\n{ast.unparse(body[loss])}")
    for stmt in body[loss + 1 :]:
        if _logits_uses(stmt) and not _returns(stmt):
            raise refuse(f"its forward uses the logits after the loss:\n{ast.unparse(stmt)}")
    between = [s for s in body[head + 1 : loss] if ast.unparse(s) != "loss = None"]
    code = "\n".join(ast.unparse(s) for s in between)
    for transform in _TRANSFORMS:
        if code == transform.code:
            return transform
    raise refuse(f"its forward post-processes the logits in a way fused_ce does not know:\n{code}")


def _is_logits_assignment(stmt: ast.stmt) -> bool:
    """``logits = self.lm_head(...)``, optionally followed by ``.float()`` or ``.contiguous()``."""
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1):
        return False
    target, value = stmt.targets[0], stmt.value
    if not (isinstance(target, ast.Name) and target.id == "logits"):
        return False
    if (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Attribute)
        and value.func.attr in ("float", "contiguous")
        and not value.args
        and not value.keywords
    ):
        value = value.func.value  # the fused loss is fp32 anyway, and reads no logits
    return _is_self_call(value, "lm_head") and len(value.args) == 1 and not value.keywords


def _returns(stmt: ast.stmt) -> bool:
    """``return ...``, or ``if ...: ...; return ...`` (the output, e.g. the tuple of ``return_dict=False``)."""
    return isinstance(stmt, ast.Return) or (
        isinstance(stmt, ast.If) and not stmt.orelse and isinstance(stmt.body[-1], ast.Return)
    )


def _logits_uses(stmt: ast.stmt) -> int:
    return sum(isinstance(n, ast.Name) and n.id == "logits" for n in ast.walk(stmt))


def _loss_takes_logits(stmt: ast.stmt) -> bool:
    call = next(n for n in ast.walk(stmt) if _is_self_call(n, "loss_function"))
    given = [kw.value for kw in call.keywords if kw.arg == "logits"] or call.args[:1]
    return len(given) == 1 and isinstance(given[0], ast.Name) and given[0].id == "logits"


# --------------------------------------------------------------------------- the patch
