"""What every benchmark script in ``bench/`` shares.

Argument parsing (devices, dtypes, shapes, lists of names), the interleaved timing of
several functions, the device's copy bandwidth, the environment and git metadata,
JSON, plain-text tables and a tqdm progress bar. The scripts import it as a sibling
module (``import harness``): Python puts a script's own folder first on ``sys.path``,
so ``python bench/<script>.py`` works from any directory; ``tests/test_bench.py``
puts ``bench/`` on ``sys.path`` itself. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import fused_ce

GB = 1e9
COPY_BYTES = 2 * 2**30  # the buffer of the copy bandwidth measurement

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


# --------------------------------------------------------------------------- arguments


def parse_list(text: str) -> list[str]:
    """``"a, b,a"`` -> ``["a", "b", "a"]``; an empty list is an error."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def parse_shapes(text: str, names: str = "NxV", example: str = "4096x32000") -> list[tuple[int, ...]]:
    """``"4096x32000,8x16"`` -> ``[(4096, 32000), (8, 16)]``, each with the dimensions ``names``."""
    shapes = []
    for item in parse_list(text):
        try:
            dims = tuple(int(x) for x in item.lower().replace("×", "x").split("x"))
        except ValueError:
            dims = ()
        if len(dims) != len(names.split("x")):
            raise argparse.ArgumentTypeError(f"shape {item!r} is not {names}, e.g. {example}")
        if min(dims) < 1:
            raise argparse.ArgumentTypeError(f"shape {item!r}: {', '.join(names.split('x'))} must be positive")
        shapes.append(dims)
    return shapes


def shape_type(names: str = "NxV", example: str = "4096x32000") -> Callable[[str], tuple[int, ...]]:
    """An argparse ``type`` for one shape, e.g. ``--shape 4096x8x32000`` with ``names="NxDxV"``."""

    def parse(text: str) -> tuple[int, ...]:
        shapes = parse_shapes(text, names, example)
        if len(shapes) != 1:
            raise argparse.ArgumentTypeError(f"expected one shape {names}, e.g. {example}")
        return shapes[0]

    return parse


def parse_dtypes(text: str) -> list[torch.dtype]:
    """``"float32,bf16"`` -> ``[torch.float32, torch.bfloat16]`` (duplicates dropped)."""
    names = parse_list(text)
    unknown = [d for d in names if d not in DTYPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown dtype(s) {unknown}; choose from {sorted(DTYPES)}")
    return list(dict.fromkeys(DTYPES[d] for d in names))


def parse_dtype(text: str) -> torch.dtype:
    """One dtype, by any name of ``DTYPES``."""
    dtypes = parse_dtypes(text)
    if len(dtypes) != 1:
        raise argparse.ArgumentTypeError(f"expected one dtype, got {text!r}")
    return dtypes[0]


def parse_choices(text: str, choices: Iterable[str], what: str) -> list[str]:
    """The comma-separated names in ``text`` (duplicates dropped), each one of ``choices``."""
    choices = list(choices)
    names = list(dict.fromkeys(parse_list(text)))
    unknown = [n for n in names if n not in choices]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; choose from {choices}")
    return names


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")


def resolve_device(parser: argparse.ArgumentParser, name: str | None) -> torch.device:
    """``--device``: CUDA when torch sees a GPU and none was asked for; an error for a CUDA it cannot see."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    return torch.device(name)


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (it is off anyway when stderr is no TTY)"
    )


# --------------------------------------------------------------------------- timing


@dataclass
class Timed:
    """One function to time, ``run()``, with untimed ``before()`` and ``after()`` around each call.

    ``before`` prepares what a call needs (e.g. a fresh copy of inputs the function
    overwrites), ``after`` drops what it left (e.g. the gradient, so that every call
    allocates its own as a training step does).
    """

    run: Callable[[], object]
    before: Callable[[], object] | None = None
    after: Callable[[], object] | None = None


def time_interleaved(
    fns: Mapping[str, Callable[[], object] | Timed],
    *,
    reps: int,
    warmup: int,
    device: torch.device | str,
    bar: tqdm | None = None,
    label: str = "",
) -> dict[str, list[float] | str]:
    """Times each function ``reps`` times after ``warmup`` untimed calls; returns its times in ms, or why it failed.

    Every repetition (warm-up included) calls each function once, round robin, the
    first one rotating from repetition to repetition, so that the noise of a shared
    machine falls on all of them alike. On CUDA each call sits between two CUDA events
    and a repetition ends with one synchronisation; on the CPU each call is timed with
    ``time.perf_counter``. A function that raises (out of memory, a compiler that
    fails, ...) is dropped from the later repetitions and reported by its reason.
    ``bar`` (from :func:`progress`) advances by one step per function and repetition.

    Why not ``torch.utils.benchmark.Timer``: it times a block of calls of one
    statement, so it cannot interleave several functions within a repetition; its
    setup runs once per block, not untimed around each call (a fresh input, a dropped
    gradient); and on CUDA it synchronises and reads the host clock around every
    block instead of reading CUDA events. This loop is the one timing loop of bench/.
    """
    device = torch.device(device)
    timed = {name: fn if isinstance(fn, Timed) else Timed(fn) for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in timed}
    failed: dict[str, str] = {}
    for rep in range(warmup + reps):
        if bar is not None:
            stage = f"warm-up {rep + 1}/{warmup}" if rep < warmup else f"rep {rep - warmup + 1}/{reps}"
            bar.set_postfix_str(f"{label}: {stage}" if label else stage)
        active = [name for name in timed if name not in failed]
        first = rep % len(active) if active else 0
        for name, value in _timed_round(timed, active[first:] + active[:first], device).items():
            if isinstance(value, str):
                failed[name] = value
            elif rep >= warmup:
                times[name].append(value)
        if bar is not None:
            bar.update(len(timed))
    return {name: failed.get(name, times[name]) for name in timed}


def _timed_round(timed: Mapping[str, Timed], order: Sequence[str], device: torch.device) -> dict[str, float | str]:
    """Calls each function once, in ``order``: its time in ms, or why it failed."""
    cuda = device.type == "cuda"
    out: dict[str, float | str] = {}
    events = {}
    for name in order:
        fn = timed[name]
        try:
            if fn.before is not None:
                fn.before()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn.run()
                end.record()
                events[name] = (start, end)
            else:
                start_s = time.perf_counter()
                fn.run()
                out[name] = (time.perf_counter() - start_s) * 1e3
        except Exception as e:  # out of memory, a compiler that fails, ...
            out[name] = reason(e)
        finally:
            if fn.after is not None:
                fn.after()
        if isinstance(out.get(name), str):
            free_memory(device)
    if cuda:
        torch.cuda.synchronize(device)
        out.update({name: start.elapsed_time(end) for name, (start, end) in events.items()})
    return out


def measure_copy_gbps(device: torch.device, nbytes: int = COPY_BYTES, reps: int = 10) -> float | None:
    """CUDA: the copy bandwidth, ``dst.copy_(src)`` of ``nbytes``, read + write counted; None elsewhere."""
    if device.type != "cuda":
        return None
    try:
        src = torch.ones(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
    except torch.cuda.OutOfMemoryError:
        return None
    try:
        times = time_interleaved({"copy": lambda: dst.copy_(src)}, reps=reps, warmup=3, device=device)["copy"]
    finally:
        src = dst = None
        free_memory(device)
    if isinstance(times, str):
        return None
    return 2 * nbytes / (statistics.median(times) * 1e-3) / GB


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reason(error: BaseException) -> str:
    """A one-line reason for a failure: the exception's type and first line, at most 200 characters."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------- environment


def environment(device: torch.device) -> dict:
    """What the figures depend on: the device, torch, fused_ce and its git commit, threads, the date."""
    meta: dict = {}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    else:
        meta["cpu"] = cpu_model()
    meta.update(
        torch=torch.__version__,
        git_sha=_git("rev-parse", "--short", "HEAD") or "unknown",
        git_dirty=_git_dirty(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=device.type,
        threads=torch.get_num_threads(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cuda=torch.version.cuda,
        python=platform.python_version(),
        fused_ce=fused_ce.__version__,
        fused_ce_cuda_kernels=fused_ce.cuda_kernels_available(),
    )
    return meta


def describe(meta: dict) -> str:
    """One line of :func:`environment`'s metadata (and ``copy_gbps`` where measured)."""
    device = f"GPU {meta['gpu']}" if "gpu" in meta else f"CPU {meta['cpu']}"
    parts = [device, f"torch {meta['torch']}", f"fused_ce {meta['git_sha']}", f"{meta['threads']} threads"]
    parts.append(f"cpu capability {meta['cpu_capability']}")
    if meta.get("copy_gbps") is not None:
        parts.append(f"copy {meta['copy_gbps']:.0f} GB/s")
    return ", ".join(parts)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _git(*args: str) -> str | None:
    """The output of a git command in this repository, or None."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _git_dirty() -> bool | None:
    """Whether tracked files differ from HEAD (the build may not be HEAD's); None without git."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


# --------------------------------------------------------------------------- output


def write_json(path: str | Path, document: dict) -> None:
    """Writes ``document`` as indented JSON, creating the parent folder."""
    target = Path(path)
    if target.parent != Path(""):
        target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(document, indent=2) + "\n")


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    left: Iterable[str] = (),
    groups: Sequence[object] | None = None,
    notes: Sequence[str] = (),
) -> str:
    """A plain-text table: the ``left`` columns left-aligned, the others right-aligned.

    ``groups`` (one key per row) puts a blank line where the key changes; ``notes``
    follow the table after a blank line.
    """
    left = set(left)
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if h in left else c.rjust(w) for c, w, h in zip(cells, widths, headers)).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    for i, cells in enumerate(rows):
        if groups is not None and i > 0 and groups[i] != groups[i - 1]:
            out.append("")
        out.append(line(cells))
    return "\n".join(out + ([""] + list(notes) if notes else []))


def fmt_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 10 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def progress(total: int, *, enabled: bool = True) -> tqdm:
    """A tqdm bar on stderr, drawn only when ``enabled`` and stderr is a terminal, erased when closed."""
    return tqdm(total=total, disable=None if enabled else True, leave=False, dynamic_ncols=True, unit="call")
