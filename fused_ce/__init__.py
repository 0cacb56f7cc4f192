"""fused_ce: fused cross-entropy kernels (CPU and CUDA) for large-vocabulary training.

``fused_ce.cross_entropy`` is a drop-in replacement for ``torch.nn.functional.cross_entropy``
that reads each row of logits once (an online log-sum-exp), keeps nothing of size N x V
for backward, and writes the gradient in one pass.
"""

import torch  # loads libtorch, which fused_ce._C links against

try:
    from . import _C  # noqa: F401 -- loading the library registers the ops
except ImportError as e:  # pragma: no cover - depends on the build
    raise ImportError(
        "fused_ce's compiled extension fused_ce._C could not be loaded "
        f"({e}). Build it with `pip install --no-build-isolation -e .` from the repository root."
    ) from e

from . import ops  # the ops' fake kernels and autograd
from ._checks import ArgumentError, ArgumentTypeError
from ._stats import CrossEntropyStats
from ._version import __version__
from .distill import distillation_loss
from .distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
from .functional import cross_entropy, entropy, focal_loss, set_target_validation
from .linear import LinearCrossEntropyLoss, linear_cross_entropy, linear_distillation_loss
from .modules import CrossEntropyLoss
from .ops import cuda_kernels_available
from .partial import slice_cross_entropy

del torch

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "CrossEntropyLoss",
    "CrossEntropyStats",
    "LinearCrossEntropyLoss",
    "__version__",
    "cross_entropy",
    "cuda_kernels_available",
    "distillation_loss",
    "entropy",
    "focal_loss",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "ops",
    "set_target_validation",
    "slice_cross_entropy",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
]
