"""A tiny, dependency-free progress bar for long benchmark runs, drawn on stderr.

It draws nothing unless its stream is a terminal, so logs and pipes stay clean::

    with Progress(total=40, enabled=not args.no_progress) as bar:
        for step in steps:
            bar.update(note="fwd 4096x32000 torch")
            run(step)
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """A one-line bar: ``[#####.....]  12/40  30%  0:42 < 1:38  note``.

    Args:
        total: the number of steps the work takes.
        enabled: False draws nothing (the bar is also off when ``stream`` is not a TTY).
        stream: where to draw; stderr by default.
        width: the bar's width in characters.
        min_interval: seconds between redraws (updates in between only count).
    """

    def __init__(
        self,
        total: int,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        width: int = 24,
        min_interval: float = 0.1,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and _is_tty(self.stream)
        self.total = max(int(total), 1)
        self.done = 0
        self.note = ""
        self.width = width
        self.min_interval = min_interval
        self._start = time.monotonic()
        self._last_draw = float("-inf")
        self._drawn = False

    def update(self, n: int = 1, note: str | None = None) -> None:
        """Counts ``n`` steps done; ``note`` (when given) replaces the text after the bar."""
        self.done = min(self.done + n, self.total)
        if note is not None:
            self.note = note
        self._draw(force=self.done == self.total)

    def set_note(self, note: str) -> None:
        """Replaces the text after the bar and redraws at once (e.g. before a slow step)."""
        self.note = note
        self._draw(force=True)

    def close(self) -> None:
        """Erases the bar, leaving the terminal as it was."""
        if self.enabled and self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False

    def __enter__(self) -> Progress:
        self._draw(force=True)
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _line(self) -> str:
        fraction = self.done / self.total
        filled = int(fraction * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.monotonic() - self._start
        eta = _format_seconds(elapsed / fraction - elapsed) if self.done else "?"
        return (
            f"[{bar}] {self.done:>{len(str(self.total))}}/{self.total} {fraction:4.0%} "
            f"{_format_seconds(elapsed)} < {eta}  {self.note}"
        )

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        columns = shutil.get_terminal_size(fallback=(100, 24)).columns
        self.stream.write("\r\033[K" + self._line()[: max(columns - 1, 10)])
        self.stream.flush()
        self._drawn = True


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


__all__ = ["Progress"]
