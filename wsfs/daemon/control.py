"""`wsfs sync`'s request protocol between a client and a running daemon.

The client writes a request file `cache_dir/sync/<token>.req`, then sends the daemon SIGUSR1.
On every SIGUSR1 the daemon takes the requests present *at that moment*, runs one flush cycle
that starts after it took them, and answers each with `<token>.ok` (or `<token>.err` holding
the error). A request file is written after everything the caller wants saved was written, so
the cycle that answers it covers that data: no counter races between concurrent clients, and a
signal that coalesces with another still finds its request file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from ..cachedir import CacheDir

log = logging.getLogger(__name__)

SYNC_SIGNAL = signal.SIGUSR1
STALE_ANSWER = 3600.0  # answers nobody collected are removed after this many seconds


def sync_dir(cache_dir: Path) -> Path:
    return CacheDir(cache_dir).sync_requests


# -- the daemon's side ----------------------------------------------------------------------


async def answer_requests(cache_dir: Path, sync_now: Callable[[], Awaitable[None]],
                          before_answering: Callable[[int], None]) -> None:
    """Publish everything written before the pending requests, then answer them.

    `before_answering(n)` runs between the sync and the n answers, so whatever it records
    (the daemon's status) is already there when a client reads it after its answer. Errors
    are answered, never raised: a failed sync must not end the mount.
    """
    d = sync_dir(cache_dir)
    try:
        requests = sorted(d.glob("*.req"))
    except OSError:
        return
    _remove_stale(d)
    if not requests:
        return
    error: str | None = None
    try:
        await sync_now()
    except Exception as e:  # answered to the client, who reports it
        error = str(e) or type(e).__name__
        log.warning("sync requested by `wsfs sync` failed: %s", error)
    before_answering(len(requests))
    for req in requests:
        answer = req.with_suffix(".err" if error else ".ok")
        with contextlib.suppress(OSError):
            answer.write_text(error or "")
            req.unlink()
    log.info("sync requests=%d ok=%s", len(requests), error is None)


def _remove_stale(d: Path) -> None:
    now = time.time()
    for p in [*d.glob("*.ok"), *d.glob("*.err")]:
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > STALE_ANSWER:
                p.unlink()


# -- the client's side ----------------------------------------------------------------------


class SyncRequest:
    """One `wsfs sync` request: file it, signal the daemon, then poll for the answer."""

    def __init__(self, cache_dir: Path) -> None:
        self.dir = sync_dir(cache_dir)
        self.token = f"{os.getpid()}-{secrets.token_hex(6)}"
        self.req = self.dir / f"{self.token}.req"

    def send(self, pid: int) -> None:
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self.req.write_text(str(time.time()))
        os.kill(pid, SYNC_SIGNAL)

    def answer(self) -> tuple[bool, str] | None:
        """(ok, error) once the daemon answered, else None."""
        for suffix, ok in ((".ok", True), (".err", False)):
            p = self.req.with_suffix(suffix)
            try:
                text = p.read_text()
            except FileNotFoundError:
                continue
            p.unlink(missing_ok=True)
            return ok, text
        return None

    def cancel(self) -> None:
        for suffix in (".req", ".ok", ".err"):
            self.req.with_suffix(suffix).unlink(missing_ok=True)
