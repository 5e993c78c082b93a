"""The daemon's figures: upload rate, and Prometheus metrics on an opt-in HTTP endpoint.

`wsfs mount --metrics ADDR:PORT` serves `GET /metrics` in the Prometheus text format (0.0.4)
from a small trio server in the mount's nursery. The exposition is `prometheus_client`'s
(`generate_latest` over a registry of our own), never its HTTP server, which would start a
thread beside trio. What a scrape shows:
- the gauges and counters of the status dictionary the daemon writes to `status.json` every
  half second, read at scrape time, so `wsfs status` and a scrape never disagree;
- latency histograms of the FUSE requests by operation and of the store requests by kind,
  and store failures by kind, counted from the mount's first request (`wsfs.latency`);
- the process: CPU seconds, resident memory, open fds, start time (`ProcessCollector`).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from ..errors import UsageError
from ..latency import BUCKETS, Latencies

log = logging.getLogger(__name__)

RATE_WINDOW = 10.0  # seconds of samples behind the upload rate
# What `generate_latest` writes: the text format every Prometheus reads (not the 1.0.0 that
# newer prometheus_client versions name CONTENT_TYPE_LATEST).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# name, type, help, status key (None: computed in `_computed`)
METRICS: tuple[tuple[str, str, str, str | None], ...] = (
    ("wsfs_dirty_bytes", "gauge", "Bytes written locally and not yet uploaded.", "dirty_bytes"),
    ("wsfs_dirty_blocks", "gauge", "Dirty blocks not yet uploaded.", "dirty_blocks"),
    ("wsfs_upload_queue_blocks", "gauge", "Blocks being uploaded now.", "uploading_blocks"),
    ("wsfs_upload_queue_bytes", "gauge", "Bytes being uploaded now.", "uploading_bytes"),
    ("wsfs_upload_rate_bytes", "gauge", f"Upload rate over the last {RATE_WINDOW:.0f}s.",
     "upload_rate"),
    ("wsfs_uploaded_blocks_total", "counter", "Blocks uploaded since mount.",
     "uploaded_blocks"),
    ("wsfs_uploaded_bytes_total", "counter", "Bytes uploaded since mount.", "uploaded_bytes"),
    ("wsfs_retries_total", "counter", "Store requests retried since mount.", "retries"),
    ("wsfs_errors_total", "counter", "Flush cycles that failed since mount.", "errors"),
    ("wsfs_cache_hits_total", "counter", "Block reads served by the local cache.",
     "cache_hits"),
    ("wsfs_cache_misses_total", "counter", "Block reads that had to wait for a download.",
     "cache_misses"),
    ("wsfs_downloads_total", "counter",
     "Blocks downloaded from the store (readahead and prefetch included).", "downloads"),
    ("wsfs_cache_bytes", "gauge", "Bytes in the clean block cache.", "cache_bytes"),
    ("wsfs_cache_limit_bytes", "gauge", "Size limit of the clean block cache.", "cache_limit"),
    ("wsfs_checkpoint_seq", "gauge", "Sequence number of the newest published checkpoint.",
     "checkpoint"),
    ("wsfs_checkpoint_age_seconds", "gauge",
     "Seconds since this mount last published a checkpoint, or since it started if it has "
     "published none yet.", None),
    ("wsfs_lease_age_seconds", "gauge",
     "Seconds since the lease was last renewed (another host may take it after its TTL).",
     None),
    ("wsfs_up", "gauge", "1 while the daemon serves, 0 while it flushes at unmount.", None),
)


def _computed(name: str, status: Mapping[str, Any], now: float) -> float | None:
    """The metrics that are not a status field as it is (None: not exposed now)."""
    if name == "wsfs_checkpoint_age_seconds":
        since = status.get("last_checkpoint_time") or status.get("started")
        return None if since is None else max(0.0, now - float(since))
    if name == "wsfs_lease_age_seconds":
        lease = status.get("lease") or {}
        renewed = lease.get("renewed")
        return None if renewed is None else max(0.0, now - float(renewed))
    return 1.0 if status.get("state") == "serving" else 0.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The daemon's figures at one moment: taken in the trio thread, where they change, and
    turned into text in a worker thread (see `serve`)."""

    status: Mapping[str, Any]
    fuse: dict[str, tuple[list[int], float]]
    store: dict[str, tuple[list[int], float]]
    store_failures: dict[str, int]
    time: float


class Figures:
    """Where a scrape's figures come from: the status, the two sets of histograms."""

    def __init__(self, get_status: Callable[[], Mapping[str, Any]], fuse: Latencies,
                 store: Latencies) -> None:
        self.get_status = get_status
        self.fuse = fuse
        self.store = store

    def snapshot(self) -> Snapshot:
        return Snapshot(self.get_status(), self.fuse.histograms(), self.store.histograms(),
                        self.store.failures(), time.time())


class _SnapshotCollector:
    """One snapshot as Prometheus metric families (a `prometheus_client` collector)."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        status = self.snap.status
        mountpoint = str(status.get("mountpoint", ""))
        for name, kind, help_text, key in METRICS:
            value = float(status.get(key) or 0) if key is not None else _computed(
                name, status, self.snap.time)
            if value is None:
                continue
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                name, help_text, labels=["mountpoint"])
            family.add_metric([mountpoint], value)
            yield family
        yield _histograms("wsfs_fuse_request_seconds", "Time to answer a FUSE request, by "
                          "operation.", "op", mountpoint, self.snap.fuse)
        yield _histograms("wsfs_store_request_seconds", "Time of a store request, by kind "
                          "(a failed one included; a listing counts as one).", "kind",
                          mountpoint, self.snap.store)
        errors = CounterMetricFamily("wsfs_store_errors", "Store requests that failed, by "
                                     "kind, since the mount's first request.",
                                     labels=["mountpoint", "kind"])
        for kind, count in sorted(self.snap.store_failures.items()):
            errors.add_metric([mountpoint, kind], count)
        yield errors


def _histograms(name: str, help_text: str, label: str, mountpoint: str,
                histograms: dict[str, tuple[list[int], float]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, help_text, labels=["mountpoint", label])
    bounds = [*(f"{b:g}" for b in BUCKETS), "+Inf"]
    for key, (counts, total) in sorted(histograms.items()):
        cumulative = 0
        buckets = []
        for bound, count in zip(bounds, counts, strict=True):
            cumulative += count
            buckets.append((bound, float(cumulative)))
        family.add_metric([mountpoint, key], buckets, total)
    return family


def exposition(snap: Snapshot) -> bytes:
    """The text of a scrape: the snapshot and this process's figures, from a registry of
    their own (not prometheus_client's global one: nothing else belongs in a scrape)."""
    reg = CollectorRegistry()
    reg.register(_SnapshotCollector(snap))
    ProcessCollector(registry=reg)
    return generate_latest(reg)


class RateMeter:
    """Bytes per second of a growing counter, over a sliding window of samples."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def sample(self, total: int, now: float | None = None) -> float:
        """Record the counter's value now and return the rate over the window."""
        now = time.monotonic() if now is None else now
        self._samples.append((now, total))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()
        t0, v0 = self._samples[0]
        return (total - v0) / (now - t0) if now > t0 else 0.0


def parse_address(text: str) -> tuple[str, int]:
    """'127.0.0.1:9100' or ':9100' (all interfaces) or '[::1]:9100' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"the metrics address {text!r} must be HOST:PORT, like 127.0.0.1:9100")
    return host.strip("[]") or "0.0.0.0", int(port)


async def open_listeners(address: str) -> list[trio.SocketListener]:
    """Bind the metrics port before the mount reports ready, so a busy port fails the mount."""
    host, port = parse_address(address)
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as e:
        from ..errors import MountError

        raise MountError(f"cannot serve metrics on {address}: {e.strerror or e}; "
                         "choose another --metrics address") from None


async def serve(listeners: list[trio.SocketListener], figures: Figures) -> None:
    """Answer `GET /metrics` (and `GET /`) until cancelled; anything else gets a 404.

    The figures are copied in the trio thread (they change there), and the text is made in
    a worker thread: ~7 ms for a mount that served 16 kinds of FUSE request, which would
    otherwise stall every FUSE request for as long, at every scrape.
    """

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(5):
                request = b""
                while b"\r\n\r\n" not in request and b"\n\n" not in request:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    request += chunk
                    if len(request) > 16384:
                        break
                parts = request.split(b"\r\n", 1)[0].split()
                if len(parts) >= 2 and parts[0] in (b"GET", b"HEAD") and \
                        parts[1].split(b"?")[0] in (b"/metrics", b"/"):
                    body = await trio.to_thread.run_sync(exposition, figures.snapshot())
                    head = (b"HTTP/1.1 200 OK\r\nContent-Type: "
                            + CONTENT_TYPE.encode() + b"\r\n")
                else:
                    body = b"not found: try GET /metrics\n"
                    head = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n"
                head += b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                await stream.send_all(head + (b"" if parts[:1] == [b"HEAD"] else body))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            log.debug("metrics client went away: %s", e)
        finally:
            await stream.aclose()

    await trio.serve_listeners(handle, listeners)
