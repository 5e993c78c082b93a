"""Progress of a flush, for a person at a terminal and for the log.

One renderer serves `wsfs unmount`, `wsfs sync` and the daemon's own final flush at container
stop: at a terminal it redraws one line (bytes and blocks left, upload rate, ETA) a few times
a second, counting down, and ends with a closing line (`closing`); anywhere else it stays
quiet on the terminal and writes a line to the log every few seconds, so a container's log
still says how the last flush went. Sizes are written one way everywhere in wsfs's output:
binary units with one decimal (`human_bytes`: 12.0 MiB, 1.5 GiB; bytes below 1 KiB as 512 B).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger(__name__)

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': binary units, one decimal."""
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_seconds(s: float) -> str:
    """75 -> '1m15s': short durations for ETAs and ages."""
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    if s < 86400:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    return f"{int(s // 86400)}d{int(s % 86400 // 3600):02d}h"


def human_elapsed(s: float) -> str:
    """4.23 -> '4.2 s': how long a command took (`human_seconds` from a minute on)."""
    return f"{max(0.0, s):.1f} s" if s < 60 else human_seconds(s)


def closing(uploaded: int, done: str, elapsed: float, checkpoint: object = None) -> str:
    """The line that ends a flush that saved everything: 'wsfs: all in the store
    (123.4 MiB uploaded, checkpoint #12); unmounted /workspace in 4.2 s'."""
    detail = f"{human_bytes(max(0, uploaded))} uploaded"
    if checkpoint is not None:
        detail += f", checkpoint #{checkpoint}"
    return f"wsfs: all in the store ({detail}); {done} in {human_elapsed(elapsed)}"


def describe(left: int, rate: float, blocks: int | None = None) -> str:
    """'12.0 MiB left (3 blocks), 4.0 MiB/s, ETA 3s': the one line every display shows."""
    text = f"{human_bytes(left)} left"
    if blocks is not None:
        text += f" ({blocks} blocks)"
    if rate > 0:
        text += f", {human_bytes(rate)}/s"
        if left > 0:
            text += f", ETA {human_seconds(left / rate)}"
    return text


class Progress:
    """A progress display that redraws at a terminal and logs elsewhere."""

    def __init__(
        self,
        what: str,
        *,
        stream: TextIO | None = None,
        tty: bool | None = None,
        log_every: float = 5.0,
        redraw_every: float = 0.2,
    ) -> None:
        self.what = what
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.log_every = log_every
        self.redraw_every = redraw_every
        self._last_log = -float("inf")
        self._last_draw = -float("inf")
        self._drawn = False
        self.start = time.monotonic()

    def update(self, left: int, rate: float, blocks: int | None = None,
               note: str | None = None) -> None:
        """Show the current figures (rate-limited: call it as often as you like)."""
        now = time.monotonic()
        line = f"{self.what}: {describe(left, rate, blocks)}"
        if note:
            line += f" [{note}]"
        if self.tty and now - self._last_draw >= self.redraw_every:
            self._last_draw = now
            self.stream.write(f"\r{line}\x1b[K")
            self.stream.flush()
            self._drawn = True
        if now - self._last_log >= self.log_every:
            self._last_log = now
            log.info("progress what=%r left_bytes=%d rate_bps=%.0f%s", self.what, left, rate,
                     f" note={note!r}" if note else "")

    def finish(self, message: str | None = None) -> None:
        """End the display: clear the line at a terminal and log how long it took."""
        elapsed = time.monotonic() - self.start
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        if message:
            if self.tty:
                self.stream.write(f"{message}\n")
                self.stream.flush()
            log.info("done what=%r elapsed_s=%.1f msg=%r", self.what, elapsed, message)
