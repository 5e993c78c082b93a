"""The daemon's figures: upload rate, and Prometheus metrics on an opt-in HTTP endpoint.

`wsfs mount --metrics ADDR:PORT` serves `GET /metrics` in the Prometheus text format (0.0.4)
from a small trio server in the mount's nursery. Every figure comes from the same status
dictionary that the daemon writes to `status.json` every half second, so `wsfs status` and a
Prometheus scrape never disagree.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import trio

from .errors import UsageError

log = logging.getLogger(__name__)

RATE_WINDOW = 10.0  # seconds of samples behind the upload rate

# name, type, help, status key (None: computed below)
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
     "Seconds since this mount last published a checkpoint (absent before the first).", None),
    ("wsfs_up", "gauge", "1 while the daemon serves, 0 while it flushes at unmount.", None),
)


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


def render(status: Mapping[str, Any], now: float | None = None) -> str:
    """The status dictionary as Prometheus text, one labelled sample per metric."""
    now = time.time() if now is None else now
    mountpoint = _escape(str(status.get("mountpoint", "")))
    labels = f'{{mountpoint="{mountpoint}"}}'
    lines = []
    for name, kind, help_text, key in METRICS:
        if key is not None:
            value: float | None = float(status.get(key) or 0)
        elif name == "wsfs_checkpoint_age_seconds":
            last = status.get("last_checkpoint_time")
            value = None if last is None else max(0.0, now - float(last))
        else:
            value = 1.0 if status.get("state") == "serving" else 0.0
        if value is None:
            continue
        text = str(int(value)) if value.is_integer() else f"{value:.6g}"
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
                  f"{name}{labels} {text}"]
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


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
        from .errors import MountError

        raise MountError(f"cannot serve metrics on {address}: {e.strerror or e}; "
                         "choose another --metrics address") from None


async def serve(listeners: list[trio.SocketListener],
                get_status: Callable[[], Mapping[str, Any]]) -> None:
    """Answer `GET /metrics` (and `GET /`) until cancelled; anything else gets a 404."""

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
                    body = render(get_status()).encode()
                    head = (b"HTTP/1.1 200 OK\r\n"
                            b"Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n")
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
