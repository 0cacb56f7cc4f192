"""The extra peak memory of one call: what the benchmark, the tests and the example measure.

    from fused_ce.memory import measure_peak_mb

    peak = measure_peak_mb(lambda: loss_fn(logits, target).backward(), logits.device)

On CUDA: ``torch.cuda.max_memory_allocated()`` over what was allocated before the call.
On Linux CPUs: the peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs``) over the resident set size before the call; ``None``
where that is unavailable.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from collections.abc import Callable
from pathlib import Path

import torch

MIB = 2**20

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def measure_peak_mb(run: Callable[[], object], device: torch.device | str) -> float | None:
    """The extra peak memory of ``run()`` beyond what was allocated before it, in MiB (2**20 bytes)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MIB
    return _peak_rss_mb(run)


def _peak_rss_mb(run: Callable[[], object]) -> float | None:
    """Linux: the peak resident set size of ``run()`` over the resident set size before it.

    Writing "5" to /proc/self/clear_refs resets the high-water mark ``VmHWM`` to the
    current RSS. This sees the memory a call touches and gives back: CPU torch
    allocates large buffers with mmap and frees them with munmap. Smaller ones (up to
    32 MB, once glibc's dynamic mmap threshold has grown) come from the heap, whose
    freed pages would stay resident and hide a second call's use of them:
    ``malloc_trim`` returns them to the system first. Elsewhere: None.
    """
    gc.collect()
    _malloc_trim()
    try:
        _CLEAR_REFS.write_text("5")
        before = _status_kb("VmRSS")
    except (OSError, KeyError, ValueError):
        return None
    run()
    return (_status_kb("VmHWM") - before) * 1024 / MIB


def _malloc_trim() -> None:
    """glibc: give the heap's free pages back to the system (no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kb(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])  # "VmHWM:   123456 kB"
    raise KeyError(field)


__all__ = ["measure_peak_mb"]
