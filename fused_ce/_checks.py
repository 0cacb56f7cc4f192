"""Argument checks shared by every public function: messages that name the argument and the rule.

Errors are raised as :class:`ArgumentError` (a ``ValueError``) or
:class:`ArgumentTypeError` (a ``TypeError``); both are also ``RuntimeError``, so
code written for ``F.cross_entropy`` -- which raises ``RuntimeError`` for most bad
arguments -- catches them with the ``except`` clauses it already has.

Float options (``label_smoothing``, ``z_loss``, ``softcap``, ``temperature``, ...)
may arrive as symbolic floats inside ``torch.compile`` once their value changes
between calls, so they are checked with comparisons only -- never ``math.isfinite``
or ``float()``, which would break the graph or pin the value. A NaN fails every
comparison, so ``low <= x <= FLOAT_MAX`` also refuses NaN and infinities.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import Tensor

FLOAT_MAX = sys.float_info.max
REDUCTIONS = ("none", "mean", "sum")


class ArgumentError(ValueError, RuntimeError):
    """A bad argument value or shape. Both a ``ValueError`` and a ``RuntimeError`` (as PyTorch's own)."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument of the wrong type or dtype. Both a ``TypeError`` and a ``RuntimeError`` (as PyTorch's own)."""


def is_number(value) -> bool:
    """A Python int or float (possibly symbolic under torch.compile), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_tensor(value, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise ArgumentTypeError(f"{name} must be a Tensor, got {type(value).__name__}")
    return value


def check_floating(value, name: str, what: str = "") -> Tensor:
    check_tensor(value, name)
    if not value.is_floating_point():
        raise ArgumentTypeError(f"{name}{what} must be floating point, got {value.dtype}")
    return value


def check_reduction(reduction, *, allowed=REDUCTIONS) -> None:
    # PyTorch raises ValueError here (ArgumentError is one).
    if not isinstance(reduction, str) or reduction not in allowed:
        raise ArgumentError(f"reduction must be one of {allowed}, got {reduction!r}")


def check_ignore_index(ignore_index) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ArgumentTypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ArgumentError(f"ignore_index must fit in int64, got {ignore_index}")


def check_in_range(value, name: str, low, high, *, low_open: bool = False, rule: str | None = None) -> None:
    """A number with ``low <= value <= high`` (``low < value`` if low_open); NaN never passes."""
    rule = rule or f"a number in {'(' if low_open else '['}{low}, {high}]"
    if not is_number(value):
        raise ArgumentError(f"{name} must be {rule}, got {value!r}")
    above_low = value > low if low_open else value >= low
    if not (above_low and value <= high):
        raise ArgumentError(f"{name} must be {rule}, got {value!r}")


def check_label_smoothing(value) -> None:
    check_in_range(value, "label_smoothing", 0.0, 1.0, rule="a number in [0, 1]")


def check_z_loss(value) -> None:
    check_in_range(value, "z_loss", 0.0, FLOAT_MAX, rule="a finite number >= 0")


def softcap_option(value):
    """The soft-cap as the ops take it: 0 for None (off), else a finite number > 0."""
    if value is None:
        return 0.0
    check_in_range(value, "softcap", 0.0, FLOAT_MAX, low_open=True, rule="None or a finite number > 0")
    return value


def check_positive(value, name: str) -> None:
    check_in_range(value, name, 0.0, FLOAT_MAX, low_open=True, rule="a finite number > 0")


def check_device(device: torch.device) -> None:
    if device.type == "cuda":
        from .ops import cuda_kernels_available

        if not cuda_kernels_available():
            raise RuntimeError(
                "input is a CUDA tensor but this build of fused_ce has no CUDA kernels. Rebuild it with "
                "`FUSED_CE_CUDA=1 pip install --no-build-isolation -e .` (needs a CUDA build of torch and nvcc; "
                "set CUDA_HOME if nvcc is not found)"
            )
    elif device.type != "cpu":
        raise NotImplementedError(f"fused_ce runs on CPU and CUDA tensors, got a tensor on {device}")


def check_target_device(target: Tensor, device: torch.device, input_name: str = "input") -> None:
    if target.device != device:
        raise ArgumentError(f"{input_name} and target must be on the same device, got {device} and {target.device}")


def check_same_device(tensor: Tensor, name: str, device: torch.device, other: str = "input") -> None:
    if tensor.device != device:
        raise ArgumentError(f"{name} must be on {other}'s device ({device}), got {tensor.device}")


def class_weight(weight, num_classes: int, device: torch.device, acc_dtype: torch.dtype, name: str = "weight",
                 holds: str = "one entry per class"):
    """Checks a per-class weight ``(C,)``; returns it contiguous in the accumulation dtype, or None."""
    if weight is None:
        return None
    if not isinstance(weight, Tensor):
        raise ArgumentTypeError(f"{name} must be a Tensor or None, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise ArgumentTypeError(f"{name} must be floating point, got {weight.dtype}")
    if weight.shape != (num_classes,):
        raise ArgumentError(f"{name} must have shape ({num_classes},), {holds}, got {tuple(weight.shape)}")
    check_same_device(weight, name, device)
    if weight.requires_grad and torch.is_grad_enabled():
        # A RuntimeError, as PyTorch's "not differentiable with respect to argument 'weight'".
        raise NotImplementedError(
            f"{name}: gradients with respect to class weights are not supported (nor are they by "
            f"F.cross_entropy); pass {name}.detach()"
        )
    return weight.to(acc_dtype).contiguous()


# -- class-index targets out of range on CUDA ------------------------------------------------

_validate_targets = os.environ.get("FUSED_CE_VALIDATE", "0") not in ("", "0")


def set_target_validation(enabled: bool) -> None:
    """Check class-index targets on CUDA tensors too, raising ``IndexError`` when one is out of range.

    On the CPU targets are always checked. On CUDA the check costs a host
    synchronisation, so by default it is off and a row whose target is out of range
    gets a NaN loss (and NaN gradient) instead; the kernels never read out of
    bounds. The environment variable ``FUSED_CE_VALIDATE=1`` turns it on at import.
    """
    global _validate_targets
    _validate_targets = bool(enabled)


def target_validation() -> bool:
    return _validate_targets


def check_target_range(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raises IndexError for a class index outside [0, C) that is not ignore_index.

    It synchronises with the device; the message matches the CPU kernels' own check.
    """
    if target.numel() == 0:
        return
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        position = int(bad.reshape(-1).nonzero()[0, 0])
        value = int(target.reshape(-1)[position])
        raise IndexError(
            f"target: class index {value} at position {position} is out of range "
            f"[0, {num_classes}) and is not ignore_index ({ignore_index})"
        )


def validate_targets_if_asked(rows: Tensor, num_classes: int, ignore_index: int) -> None:
    """On CUDA, the opt-in range check (the CPU kernels always check); skipped inside torch.compile."""
    if _validate_targets and rows.device.type == "cuda" and not torch.compiler.is_compiling():
        check_target_range(rows, num_classes, ignore_index)
