"""Latency histograms cheap enough for every FUSE request and every store request.

The FUSE handlers are the hot path (a cached `stat` is answered in tens of microseconds), so
an observation is a bisect into fixed bucket bounds and two additions to a list: ~0.2 µs,
against ~0.74 µs for a `prometheus_client.Histogram` child, whose every update takes a lock
(measured on the development machine: docs/operations.md). `wsfs.daemon.metrics` exposes these as
Prometheus histograms. The FUSE handlers all run in the trio thread, so `Latencies` takes no
lock; store requests run in worker threads and use `SharedLatencies`, which does.
"""

from __future__ import annotations

import threading
from bisect import bisect_left

# Upper bounds in seconds: 100 µs (a cached lookup) to a minute (a large upload retried).
BUCKETS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                              0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SUM = len(BUCKETS) + 1  # a histogram is one list: a count per bucket, +Inf's, then the sum


class Latencies:
    """Histograms by name (a FUSE operation, a kind of store request) and failures by name,
    for observations from one thread.

    Names given up front are exposed from the start, at zero, so that the first failure is
    an increase a Prometheus `rate()` sees, not a new series.
    """

    def __init__(self, names: tuple[str, ...] = ()) -> None:
        self._histograms: dict[str, list[float]] = {name: self._new() for name in names}
        self._failures: dict[str, int] = dict.fromkeys(names, 0)

    @staticmethod
    def _new() -> list[float]:
        return [0] * _SUM + [0.0]

    def observe(self, name: str, seconds: float) -> None:
        h = self._histograms.get(name)
        if h is None:
            h = self._histograms[name] = self._new()
        h[bisect_left(BUCKETS, seconds)] += 1
        h[_SUM] += seconds

    def failed(self, name: str) -> None:
        self._failures[name] = self._failures.get(name, 0) + 1

    def histograms(self) -> dict[str, tuple[list[int], float]]:
        """name -> (count per bucket of BUCKETS and above them, sum of the observations)."""
        return {name: ([int(c) for c in h[:_SUM]], h[_SUM])
                for name, h in list(self._histograms.items())}

    def failures(self) -> dict[str, int]:
        return dict(self._failures)


class SharedLatencies(Latencies):
    """`Latencies` observed from several threads (a lock keeps the counts exact)."""

    def __init__(self, names: tuple[str, ...] = ()) -> None:
        super().__init__(names)
        self._lock = threading.Lock()

    def observe(self, name: str, seconds: float) -> None:
        with self._lock:
            super().observe(name, seconds)

    def failed(self, name: str) -> None:
        with self._lock:
            super().failed(name)

    def histograms(self) -> dict[str, tuple[list[int], float]]:
        with self._lock:
            return super().histograms()
