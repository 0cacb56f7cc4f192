"""DTensor inputs: torchtitan-style tensor parallelism, logits (or the LM head) sharded by class.

PyTorch's answer for a vocabulary-sharded loss is a ``DTensor`` whose class dimension is
sharded on a mesh dimension, passed to ``F.cross_entropy`` under ``loss_parallel()``.
:func:`fused_ce.cross_entropy` and :func:`fused_ce.linear_cross_entropy` take such inputs
directly:

* class dimension ``Shard`` on one mesh dimension (every other mesh dimension
  ``Replicate``): the vocabulary-parallel path (:mod:`fused_ce.distributed`) over that mesh
  dimension's process group -- one ``all_gather`` of per-row statistics, no logits moved;
* every mesh dimension ``Replicate``: the local path, on each rank's full copy;
* anything else (another dimension sharded, ``Partial``) is refused, naming the placement.

The result is a ``DTensor`` replicated over the mesh, as ``loss_parallel`` returns; its
gradient reaches each rank's shard of the logits (or of the weight). ``target`` (and
``weight``, the class weights) may be plain tensors, the same on every rank, or
replicated DTensors; class weights may also be sharded like the classes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import ArgumentError


def is_dtensor(value) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _class_mesh_dim(dtensor, class_dim: int, name: str) -> int | None:
    """The mesh dimension that shards ``class_dim`` of ``dtensor`` (None: replicated everywhere)."""
    from torch.distributed.tensor import Replicate, Shard

    sharded = None
    for mesh_dim, placement in enumerate(dtensor.placements):
        if isinstance(placement, Replicate):
            continue
        if isinstance(placement, Shard) and placement.dim % dtensor.dim() == class_dim % dtensor.dim():
            if sharded is not None:
                raise ArgumentError(f"{name}: the class dimension may be sharded on one mesh dimension only, "
                                    f"got placements {dtensor.placements}")
            sharded = mesh_dim
            continue
        raise ArgumentError(
            f"{name}: a DTensor must be sharded on its class dimension ({class_dim}) or replicated, "
            f"got placement {placement} on mesh dimension {mesh_dim} (placements {dtensor.placements})"
        )
    return sharded


def _slice(dtensor, class_dim: int) -> tuple[int, int]:
    """(vocab_start, local size) of this rank's classes."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(dtensor.shape, dtensor.device_mesh, dtensor.placements)
    return offset[class_dim], shape[class_dim]


def _replicated(value, name: str):
    """A plain tensor, or a DTensor replicated everywhere, as the local tensor (None stays None)."""
    if not is_dtensor(value):
        return value
    if not all(p.is_replicate() for p in value.placements):
        raise ArgumentError(f"{name}: a DTensor {name} must be replicated, got placements {value.placements}")
    return value.to_local()


def _class_slice(value, name: str, start: int, size: int, num_classes: int):
    """This rank's slice of a per-class tensor (class weights, a bias): given in full (plain or
    replicated) or as a DTensor sharded like the classes."""
    if value is None:
        return None
    if is_dtensor(value) and not all(p.is_replicate() for p in value.placements):
        local = value.to_local()
        if local.shape != (size,):
            raise ArgumentError(f"{name}: a sharded DTensor must be sharded as the classes ({size} here), "
                                f"got a local shape {tuple(local.shape)}")
        return local
    value = _replicated(value, name)
    if not isinstance(value, Tensor) or value.shape != (num_classes,):
        raise ArgumentError(f"{name} must have shape ({num_classes},), one entry per class, "
                            f"got {tuple(getattr(value, 'shape', ()))}")
    return value[start : start + size]


def _as_replicated(loss: Tensor, mesh):
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(loss, mesh, [Replicate()] * mesh.ndim, run_check=False)


def cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, **options):
    """:func:`fused_ce.cross_entropy` of a DTensor ``input`` (see the module docstring)."""
    from . import distributed, functional

    for unsupported in ("return_lse", "inplace_backward", "return_stats"):
        if options.get(unsupported):
            raise ArgumentError(f"{unsupported}=True is not supported for DTensor input (vocab_parallel_cross_entropy "
                                "takes return_stats on the local shards)")
    options = {k: v for k, v in options.items() if k not in ("return_lse", "inplace_backward", "return_stats")}
    if input.dim() == 0:
        raise ArgumentError("input must have a class dimension: shape (C), (N, C) or (N, C, d1, ..., dk)")
    class_dim = 0 if input.dim() == 1 else 1
    mesh = input.device_mesh
    mesh_dim = _class_mesh_dim(input, class_dim, "input")
    target = _replicated(target, "target")
    if mesh_dim is None:
        loss = functional.cross_entropy(input.to_local(), target, _replicated(weight, "weight"), ignore_index,
                                        reduction, label_smoothing, **options)
        return _as_replicated(loss, mesh)
    start, size = _slice(input, class_dim)
    # The vocabulary-parallel functions take the classes last.
    shard = input.to_local().movedim(class_dim, -1)
    loss = distributed.vocab_parallel_cross_entropy(
        shard, target, group=mesh.get_group(mesh_dim), vocab_start=start, vocab_total=input.shape[class_dim],
        weight=_class_slice(weight, "weight", start, size, input.shape[class_dim]), ignore_index=ignore_index,
        reduction=reduction, label_smoothing=label_smoothing, **options,
    )
    return _as_replicated(loss, mesh)


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, ignore_index=None,
                         **options):
    """:func:`fused_ce.linear_cross_entropy` with a DTensor weight (rows = classes) or input."""
    from . import distributed
    from .linear import api

    reference = linear_weight if is_dtensor(linear_weight) else input
    mesh = reference.device_mesh
    x = _replicated(input, "input")
    target = _replicated(target, "target")
    mesh_dim = _class_mesh_dim(linear_weight, 0, "linear_weight") if is_dtensor(linear_weight) else None
    if mesh_dim is None:
        loss = api.linear_cross_entropy(x, _replicated(linear_weight, "linear_weight"), target,
                                        linear_bias=_replicated(linear_bias, "linear_bias"),
                                        weight=_replicated(weight, "weight"), ignore_index=ignore_index, **options)
        return _as_replicated(loss, mesh)
    start, size = _slice(linear_weight, 0)
    num_classes = linear_weight.shape[0]
    # The input is replicated: its gradient is the sum of every rank's part, all-reduced.
    loss = distributed.vocab_parallel_linear_cross_entropy(
        x, linear_weight.to_local(), target, group=mesh.get_group(mesh_dim),
        bias_shard=_class_slice(linear_bias, "linear_bias", start, size, num_classes),
        class_weight=_class_slice(weight, "weight", start, size, num_classes),
        ignore_index=-100 if ignore_index is None else ignore_index, reduce_input_grad=True,
        vocab_start=start, vocab_total=num_classes, **options,
    )
    return _as_replicated(loss, mesh)
