"""What a start takes before the daemon serves: a checked store, the cache dir's lock, the
lease (taken beside the checkpoint's prefetch, and kept renewed until released), and the
kernel's mount.

Apart from serve.py, which runs the mount, because each is a step of its own that can refuse
the start with one sentence, and none needs the mount's object graph (wiring.py) but the
kernel's mount, which is given the filesystem.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO

import pyfuse3
import trio

from ..config import MountConfig
from ..errors import LeaseError, MountError
from ..fs import Operations
from ..meta import checkpoint as ckpt
from ..store import ObjectStore, open_store, probe
from ..sync.flusher import Fencing
from .lease import Lease
from .preflight import refusal_fix

log = logging.getLogger(__name__)


def open_checked_store(cfg: MountConfig) -> ObjectStore:
    store = open_store(cfg.store_url, endpoint_url=cfg.endpoint_url, region=cfg.region)
    probe(store)
    return store


async def take_lease(
    lease: Lease, force: bool, meanwhile: Callable[[], Awaitable[int]]
) -> int:
    """Take the lease (or raise LeaseError) while `meanwhile` runs; return its result.

    The lease costs several round trips (a conditional write, and on first use the check
    that the server honours it); the checkpoint download needs none of them to start.
    """
    result = 0

    async def other() -> None:
        nonlocal result
        result = await meanwhile()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            await trio.to_thread.run_sync(lease.acquire, force)
    except BaseExceptionGroup as group:  # the lease's own error, not a group of one
        raise group.exceptions[0] from None
    return result


class Renewal:
    """Renews a lease from its taking until `release`, whatever the daemon does meanwhile:
    fetching the metadata at the start, or the final flush of a large backlog, can each
    outlast its TTL, and another host would then take the workspace over from under a mount
    still uploading. (A system task: it outlives the serving nursery.)"""

    def __init__(self, lease: Lease, fencing: Fencing) -> None:
        self.lease = lease
        self.fencing = fencing  # told when a renewal finds the lease taken over
        self.renewed = time.time()  # figures for status: the last renewal, its error
        self.error: str | None = None
        self._renewing = trio.CancelScope()
        self._stopped = trio.Event()
        trio.lowlevel.spawn_system_task(self._renew)

    async def release(self) -> None:
        """Stop renewing the lease and release it; a store that refuses (an outage) only
        leaves it to expire by itself."""
        await self._stop()
        try:
            await trio.to_thread.run_sync(self.lease.release)
        except Exception as e:
            log.warning("could not release the lease (it expires by itself): %s", e)

    async def _stop(self) -> None:
        """Stop renewing, and wait for a renewal in flight: one landing after the release
        would leave the lease behind."""
        self._renewing.cancel()
        await self._stopped.wait()

    async def _renew(self) -> None:
        lease = self.lease
        try:
            with self._renewing:
                while True:
                    await trio.sleep(lease.ttl / 3)
                    try:
                        await trio.to_thread.run_sync(lease.renew)
                        if lease.lost:
                            self.fencing.fence(f"another mount took over this workspace's "
                                               f"lease ({lease.usurper}); {ckpt.FENCED_FIX}")
                            continue
                        self.renewed, self.error = time.time(), None
                    except Exception as e:
                        self.error = str(e)
                        log.warning("could not renew the lease: %s", e)
        finally:
            self._stopped.set()


def take_cache_lock(cache_dir: Path) -> IO[str]:
    """Hold an exclusive lock on the cache dir: one daemon per cache dir, on any host."""
    # "a+", not "w": truncating before the lock is ours would erase the holder's pid.
    f = open(cache_dir / "lock", "a+")  # noqa: SIM115 - held for the daemon's lifetime
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise LeaseError(
            f"another wsfs daemon (pid {holder} on this host) is using the cache dir "
            f"{cache_dir}; unmount it first or choose another --cache-dir"
        ) from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def fuse_mount(ops: Operations, mountpoint: Path, options: set[str]) -> None:
    """Mount, or raise MountError saying why the kernel (or fusermount3) refused.

    libfuse says why on stderr only, and only its message names the cause (`mount failed:
    Operation not permitted`): it is caught in a file, to become part of the one sentence
    (a file, not a pipe: an `auto_unmount` fusermount3 keeps it open for the mount's life).
    """
    with tempfile.TemporaryFile() as said:
        saved = os.dup(2)
        os.dup2(said.fileno(), 2)
        try:
            pyfuse3.init(ops, str(mountpoint), options)
            error = None
        except RuntimeError as e:
            error = e
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        said.seek(0)
        why = " ".join(said.read().decode(errors="replace").split())
    if error is None:
        if why:
            log.warning("libfuse: %s", why)
        return
    raise MountError(f"the kernel refused to mount {mountpoint} ({why or error})"
                     f"{refusal_fix(why)}")
