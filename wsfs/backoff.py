"""Exponential backoff: the one way wsfs waits before trying a failed store call again.

A `Backoff` hands out delays that double after each failure up to a cap, and starts over
after a success. The caller keeps its own loop, so it decides what a failure is, what it logs
(`delay` is the wait about to happen) and how its total time is bounded (a cancel scope or a
deadline around the loop): the flusher's cycles, its uploads and store calls, the final flush
at unmount, and the clean cache's downloads.

No jitter: a mount has one flusher and one downloader per block, so there is no herd to spread.
"""

from __future__ import annotations

import trio


class Backoff:
    """Delays of `first`, twice that, ... at most `cap` seconds."""

    __slots__ = ("cap", "delay", "first")

    def __init__(self, first: float, cap: float) -> None:
        self.first = first
        self.cap = cap
        self.delay = first  # the next wait

    def next(self) -> float:
        """The wait after this failure; the one after the next failure is twice as long."""
        delay = self.delay
        self.delay = min(delay * 2, self.cap)
        return delay

    async def sleep(self) -> None:
        """Wait out this failure's delay."""
        await trio.sleep(self.next())

    def reset(self) -> None:
        """After a success: the next failure waits `first` again."""
        self.delay = self.first
