"""A one-line progress display with rate and ETA, on stderr, only where someone is watching.

`--progress auto` (the default) shows it only when stderr is a terminal, so cron, systemd and
archive_command stay quiet; `always` forces it (into a log file, say), `never` silences it.
Redraws at most 5 times a second; callers may call add() from any thread.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

REDRAW_SECONDS = 0.2


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Bytes done out of an estimated total (0: unknown, then no percentage or ETA)."""

    def __init__(self, label: str, total: int, stream: TextIO | None, clock: float | None = None) -> None:
        self.label = label
        self.total = total
        self.stream = stream
        self.done = 0
        self._start = clock if clock is not None else time.monotonic()
        self._drawn = 0.0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.stream is not None

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            if self.stream is None:
                return
            now = time.monotonic()
            if now - self._drawn >= REDRAW_SECONDS:
                self._drawn = now
                self._draw(now)

    def line(self, now: float) -> str:
        elapsed = max(now - self._start, 1e-6)
        rate = self.done / elapsed
        text = f"{self.label}: {_size(self.done)}"
        if self.total > 0:
            share = min(self.done / self.total, 1.0)
            filled = int(share * 20)
            text = f"{self.label} [{'#' * filled}{'.' * (20 - filled)}] {share * 100:3.0f}% {_size(self.done)}/{_size(self.total)}"
        text += f"  {_size(rate)}/s"
        if self.total > 0 and rate > 0 and self.done < self.total:
            text += f"  ETA {_clock((self.total - self.done) / rate)}"
        return text

    def _draw(self, now: float) -> None:
        assert self.stream is not None
        self.stream.write("\r" + self.line(now).ljust(79) + "\r")
        self.stream.flush()

    def close(self) -> None:
        with self._lock:
            if self.stream is not None:
                self._draw(time.monotonic())
                self.stream.write("\n")
                self.stream.flush()
                self.stream = None


def progress(mode: str, label: str, total: int, stream: TextIO | None = None) -> Progress:
    """A Progress that draws on stream (default stderr) when mode and the terminal say so."""
    out = stream if stream is not None else sys.stderr
    show = mode == "always" or (mode == "auto" and out.isatty())
    return Progress(label, total, out if show else None)
